//! Admission, engine side: a new session's verdict from what the bind read brought (opens this
//! minute, the user's live threds, committed capacity, the queue, the hosts, budgets spent), the
//! admitter that lets waiting threds go oldest first and tells users their place, and metering
//! (usage charged to users, totals recorded in the store, budgets warned at 80 % and enforced at
//! 100 %). The decisions themselves are pure, in `crate::admission` and `crate::usage`; the
//! commit script checks every limit again atomically, so a stale read never overcommits.

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;
use uuid::Uuid;

use super::hosts::{hosts_of, LiveHosts};
use super::{notification_message, notification_to_owner, task_message, Engine, OutboxMessage};
use crate::admission::{self, Committed, Counts, Limit, Verdict};
use crate::core::Thred;
use crate::pattern::Pattern;
use crate::placement;
use crate::usage::{self, Budget, Charge, Metered, Spent};
use crate::Result;
use protocol::CloudEvent;

/// The sliding window `max_opens_per_user_per_minute` counts over.
pub(super) const OPENS_WINDOW_MS: i64 = 60_000;

/// What the bind read found for a new thred of an admitted pattern, in the same round trip as the
/// binding (`store::BIND_READ_SCRIPT`): nothing is written for the verdict; the commit records the
/// open in the user's window and checks every count again, atomically.
pub(super) struct AdmissionRead {
    /// New threds of the user over the last 60 s (a sliding window, not the clock's minute), this
    /// one included once: it is recorded by event id, so a redelivery counts once.
    pub(super) opens_this_minute: u64,
    pub(super) user_live: u64,
    /// What threds placed on no host hold.
    pub(super) committed: Committed,
    pub(super) queued: u64,
    /// The reporting hosts; placement reuses them in the same attempt.
    pub(super) hosts: LiveHosts,
    /// What the user spent today and this month (read only when the profile has budgets).
    pub(super) spent: Option<Spent>,
}

impl AdmissionRead {
    /// From the bind read's reply: `counts` = {opens, user live, memory, cpu, queued}, `hosts` as
    /// `read_hosts` replies, `spent` = {today's cost, this month's} or nil.
    pub(super) fn of(counts: &redis::Value, hosts: &[redis::Value], spent: &redis::Value, candidate: &Thred) -> Result<AdmissionRead> {
        let (opens_this_minute, user_live, memory, cpu, queued): (u64, u64, Option<u64>, Option<u64>, u64) =
            redis::from_redis_value(counts)?;
        let spent = match spent {
            redis::Value::Nil => None,
            spent => {
                let (day, month): (Option<f64>, Option<f64>) = redis::from_redis_value(spent)?;
                Some(Spent { day: day.unwrap_or(0.0), month: month.unwrap_or(0.0) })
            }
        };
        Ok(AdmissionRead {
            opens_this_minute,
            user_live,
            committed: Committed { memory_mib: memory.unwrap_or(0), cpu_millis: cpu.unwrap_or(0) },
            queued,
            hosts: hosts_of(hosts, candidate),
            spent,
        })
    }
}

impl Engine {
    /// The verdict for a new thred of `user` from what the bind read found.
    pub(super) fn admission_verdict(&self, user: &str, read: &AdmissionRead) -> Verdict {
        let mut committed = read.committed;
        let mut capacity = self.inner.capacity;
        // Hosts report: the session fits if one of them has room (the one placement would pick).
        if let LiveHosts::Reporting(hosts) = &read.hosts {
            match placement::place(self.need(), hosts) {
                Some(host) => {
                    capacity = capacity.with_budget(host.budget_memory_mib, host.budget_cpu_millis);
                    committed = host.committed;
                }
                None => committed = Committed { memory_mib: u64::MAX / 2, cpu_millis: u64::MAX / 2 },
            }
        }
        let counts = Counts { opens_this_minute: read.opens_this_minute, user_live: read.user_live, queued: read.queued, committed };
        let mut verdict = admission::decide(&capacity, counts);
        if !matches!(verdict, Verdict::Refuse { .. }) && self.inner.rates.has_budgets() {
            let spent = read.spent.unwrap_or_default();
            if let Some(budget) = self.inner.rates.exhausted(spent) {
                let (limit, _) = self.inner.rates.of_budget(budget, spent);
                verdict = Verdict::Refuse { limit: Limit::Budget(budget), max: limit };
            }
        }
        if verdict != Verdict::Admit {
            tracing::info!(user, ?verdict, "open not admitted at once");
        }
        verdict
    }

    /// Lets waiting threds go when capacity frees, oldest first, and tells each waiting user their
    /// position whenever it changes. Runs every second and whenever a commit freed capacity or
    /// queued a thred; what it sends is idempotent (the admitted event's id is derived from the
    /// thred's version), so two replicas doing it at once do no harm.
    pub(super) async fn admit_forever(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut told_positions: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let meter_interval = Duration::from_millis(self.inner.config.meter_interval_ms.max(100));
        let mut last_metered = tokio::time::Instant::now();
        loop {
            let meter_now = last_metered.elapsed() >= meter_interval;
            if let Err(error) = self.notice_gone_hosts().await {
                tracing::warn!(%error, "could not check for gone hosts");
            }
            if let Err(error) = self.move_off_draining_hosts().await {
                tracing::warn!(%error, "could not move the sessions of drained hosts");
            }
            if let Err(error) = self.fail_over_gone_hosts().await {
                tracing::warn!(%error, "could not fail over the sessions of gone hosts");
            }
            for pattern in self.inner.patterns.iter().filter(|pattern| pattern.start.admission.is_some()) {
                if let Err(error) = self.admit_waiting(pattern, &mut told_positions).await {
                    tracing::warn!(%error, pattern = %pattern.name, "admission round failed; retrying");
                }
                if meter_now {
                    if let Err(error) = self.meter(pattern, meter_interval).await {
                        tracing::warn!(%error, pattern = %pattern.name, "metering failed; the next round charges the time");
                    }
                }
            }
            if meter_now {
                last_metered = tokio::time::Instant::now();
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1).min(meter_interval)) => {}
                () = self.inner.admission_wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Charges every user of `pattern` for the time their live threds held capacity or idled since
    /// they were last metered, records the totals (Redis for admission, the store for the API), and
    /// acts on budgets: 80 % spent warns the user's sessions once per period, 100 % stops them.
    async fn meter(&self, pattern: &Pattern, interval: Duration) -> Result<()> {
        let Some(spec) = &pattern.start.admission else { return Ok(()) };
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let user_prefix = keys.user_live(&pattern.name, "");
        let mut user_keys: Vec<String> = Vec::new();
        {
            let mut scan: redis::AsyncIter<String> = redis.scan_match(format!("{user_prefix}*")).await?;
            while let Some(key) = futures::StreamExt::next(&mut scan).await {
                user_keys.push(key);
            }
        }
        let now = self.inner.clock.now();
        let now_ms = now.timestamp_millis();
        for user_key in user_keys {
            let Some(user) = user_key.strip_prefix(&user_prefix).map(str::to_owned) else { continue };
            let ids: Vec<String> = redis.smembers(&user_key).await?;
            let threds = self.load_threds(&ids).await?;
            let mut charge = Charge::default();
            let mut holding = Vec::new();
            for thred in threds.into_iter().filter(|thred| admission::holds_capacity(spec, thred)) {
                let metered = if spec.idle_states.contains(&thred.state) { Metered::Idle } else { Metered::Holding };
                let last: Option<i64> = redis.get(keys.metered(&thred.id)).await?;
                let since = last.unwrap_or_else(|| thred.updated_ms.max(now_ms - interval.as_millis() as i64));
                let _: () = redis.set_ex(keys.metered(&thred.id), now_ms, 24 * 3600).await?;
                let seconds = (now_ms - since).max(0) as f64 / 1000.0;
                let part = self.inner.rates.charge(metered, seconds);
                charge = charge.plus(part);
                holding.push(thred);
            }
            if holding.is_empty() {
                continue;
            }
            let mut spent = Spent::default();
            for budget in Budget::ALL {
                let period = budget.period(now);
                let usage_key = keys.usage(&user, &period);
                let mut pipeline = redis::pipe();
                for (field, value) in charge.fields() {
                    pipeline.cmd("HINCRBYFLOAT").arg(&usage_key).arg(field).arg(value).ignore();
                }
                let retention_days: i64 = if budget == Budget::Daily { 40 } else { 400 };
                pipeline.expire(&usage_key, retention_days * 24 * 3600).ignore();
                pipeline.hgetall(&usage_key);
                let (totals,): (Vec<(String, f64)>,) = pipeline.query_async(&mut redis).await?;
                let cost = totals.iter().find(|(field, _)| field == "cost").map_or(0.0, |(_, value)| *value);
                match budget {
                    Budget::Daily => spent.day = cost,
                    Budget::Monthly => spent.month = cost,
                }
                self.record_usage(&user, &period, &totals, now_ms).await?;
            }
            self.enforce_budgets(&user, spent, &holding, now).await?;
        }
        Ok(())
    }

    /// Writes a user's totals for one period to the store (`usage`, id `<user>/<period>`).
    async fn record_usage(&self, user: &str, period: &str, totals: &[(String, f64)], now_ms: i64) -> Result<()> {
        let document = usage::usage_document(user, &self.inner.profile.name, period, totals);
        let operation = protocol::store::Operation::Upsert(protocol::store::UpsertArgs {
            collection: protocol::store::collections::USAGE.to_owned(),
            id: format!("{user}/{period}"),
            doc: document.as_object().cloned().unwrap_or_default(),
        });
        let task = operation.to_task(Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-usage/{user}/{period}/{now_ms}").as_bytes()));
        self.publish_messages(&[task_message(&self.inner.config, &task)?]).await
    }

    /// Stops a user's sessions once a budget is spent (the pattern saves them first) and warns
    /// them once per period at 80 %.
    async fn enforce_budgets(&self, user: &str, spent: Spent, holding: &[Thred], now: chrono::DateTime<chrono::Utc>) -> Result<()> {
        let rates = &self.inner.rates;
        if let Some(budget) = rates.exhausted(spent) {
            let (limit, used) = rates.of_budget(budget, spent);
            for thred in holding {
                tracing::info!(user, session = %thred.key, budget = budget.as_str(), used, limit, "budget spent; stopping the session");
                let data = protocol::events::SessionBudgetExceeded { budget: budget.as_str().to_owned(), spent: used, limit };
                let mut exceeded =
                    CloudEvent::of("/berth/engine/usage", Some(&thred.key), &data).with_extension("thredid", thred.id.clone());
                exceeded.id =
                    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-budget/{}/{}", thred.id, budget.period(now)).as_bytes()).to_string();
                self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &exceeded).await?;
            }
            return Ok(());
        }
        let Some(budget) = rates.nearly_exhausted(spent) else { return Ok(()) };
        let mut redis = self.inner.redis.clone();
        let first_warning: bool = redis::cmd("SET")
            .arg(self.inner.keys.budget_warned(user, &budget.period(now)))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(400 * 24 * 3600)
            .query_async::<Option<String>>(&mut redis)
            .await?
            .is_some();
        if !first_warning {
            return Ok(());
        }
        let (limit, used) = rates.of_budget(budget, spent);
        let messages = holding
            .iter()
            .filter_map(|thred| {
                let detail = json!({"budget_warning": {"budget": budget.as_str(), "spent": used, "limit": limit}});
                let notification = notification_to_owner(
                    thred,
                    &thred.state,
                    detail,
                    &format!("berth-budget-warning/{}/{}", thred.id, budget.period(now)),
                )?;
                Some(notification_message(&self.inner.config, &notification))
            })
            .collect::<Result<Vec<OutboxMessage>>>()?;
        self.publish_messages(&messages).await
    }

    async fn admit_waiting(&self, pattern: &Pattern, told_positions: &mut std::collections::HashMap<String, u64>) -> Result<()> {
        let Some(spec) = &pattern.start.admission else { return Ok(()) };
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let waiting: Vec<String> = redis.zrange(keys.queue(&pattern.name), 0, -1).await?;
        told_positions.retain(|thred_id, _| waiting.contains(thred_id));
        if waiting.is_empty() {
            return Ok(());
        }
        let (memory, cpu): (Option<u64>, Option<u64>) =
            redis::pipe().hget(keys.capacity(), "memory").hget(keys.capacity(), "cpu").query_async(&mut redis).await?;
        let committed = Committed { memory_mib: memory.unwrap_or(0), cpu_millis: cpu.unwrap_or(0) };
        let threds = self.load_threds(&waiting).await?;
        for (index, thred_id) in waiting.iter().enumerate() {
            let Some(thred) = threds.iter().find(|thred| &thred.id == thred_id) else { continue };
            if index == 0 && self.has_room(thred, committed).await? {
                // The pattern names the type; the data is session.admitted's.
                let data = protocol::events::to_data(&protocol::events::SessionAdmitted {});
                let mut admitted = CloudEvent::new(&spec.admitted_event, "/berth/engine/admission", Some(&thred.key), data)
                    .with_extension("thredid", thred.id.clone());
                admitted.id =
                    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-admitted/{}/{}", thred.id, thred.version).as_bytes()).to_string();
                self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &admitted).await?;
                continue;
            }
            let position = index as u64 + 1;
            if told_positions.get(thred_id) == Some(&position) {
                continue;
            }
            let detail = json!({"queued": true, "position": position});
            let Some(notification) =
                notification_to_owner(thred, &spec.queue_state, detail, &format!("berth-position/{}/{position}", thred.id))
            else {
                continue;
            };
            self.publish_messages(&[notification_message(&self.inner.config, &notification)?]).await?;
            told_positions.insert(thred_id.clone(), position);
        }
        Ok(())
    }
}
