//! The warm pool, engine side: which slots exist, which are free, and who claimed which.
//!
//! Redis holds the pool of this deployment: `pool:slots` (hash slot → `pending:<ms>` while the
//! container agent makes it, `free:<ms>` once ready (running), `claimed:<thred id>` once a
//! session took it) and `pool:free` (zset of the free slots by the time they became free).
//!
//! A claim is part of the commit of the new thred that makes it (the commit script checks the
//! slot is still free, takes it out of `pool:free` and records `claimed:<thred>`, all with the
//! thred): two racing opens never get one slot, and a crash leaves the slot either on a committed
//! thred (its outbox, replayed at start-up, carries the claim on) or still free. Nothing is ever
//! half-claimed.
//!
//! The keeper (`keep_pool_forever`) refills the pool in the background within the host's memory
//! budget (a slot holds its container's memory; sessions come first, so a pool that no
//! longer fits shrinks), replaces free slots older than `pool.max_idle_secs`, gives up on slots
//! whose creation never finished, and forgets the claims of threds that ended (their sessions'
//! own exits removed the containers: a claimed container held user data and never returns to
//! the pool). Reconciliation removes pool containers Redis does not know and free ones that died.

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;
use uuid::Uuid;

use super::{task_message, Engine, EventFate, Keys};
use crate::admission::Committed;
use crate::core::Thred;
use crate::pattern::Pattern;
use crate::Result;
use protocol::events::{kind, PoolSlotFailed, PoolSlotReady, PoolSlotRemoved};
use protocol::ids::SessionId;
use protocol::tasks::{ContainerPoolCreate, ContainerPoolRemove, TaskArgs};
use protocol::{CloudEvent, Task};

/// How often the keeper looks at the pool.
const KEEPER_INTERVAL: Duration = Duration::from_millis(500);
/// Slots asked for at once, so a large pool fills without a burst of container creations.
const MAX_CREATING: usize = 4;
/// Free slots an open reads beyond those it must skip.
const CANDIDATES: usize = 16;

/// The slots events in flight on this engine are trying to claim (see [`TryingSlot`]).
#[derive(Debug, Clone, Default)]
pub(super) struct SlotsInFlight(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl SlotsInFlight {
    fn len(&self) -> usize {
        self.0.lock().map_or(0, |slots| slots.len())
    }

    /// `slot`, kept from the others until the returned guard is dropped; `None` if another has it.
    fn try_take(&self, slot: String) -> Option<TryingSlot> {
        let mut slots = self.0.lock().ok()?;
        slots.insert(slot.clone()).then(|| TryingSlot { slot, in_flight: self.clone() })
    }
}

/// A slot one event is trying to claim. Only this engine's other events skip it, and only until
/// the attempt is over (the guard dropped); whether the claim holds is the commit script's to say.
#[derive(Debug)]
pub(super) struct TryingSlot {
    slot: String,
    in_flight: SlotsInFlight,
}

impl TryingSlot {
    pub(super) fn name(&self) -> &str {
        &self.slot
    }
}

impl Drop for TryingSlot {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.in_flight.0.lock() {
            slots.remove(&self.slot);
        }
    }
}

impl Keys {
    /// The warm pool's free slots: zset slot → ms it became free.
    pub fn pool_free(&self) -> String {
        format!("{}:pool:free", self.prefix)
    }
    /// Every slot of the warm pool: hash slot → `pending:<ms>`, `free:<ms>` or `claimed:<thred>`.
    pub fn pool_slots(&self) -> String {
        format!("{}:pool:slots", self.prefix)
    }
}

/// The pool events the engine handles itself (they belong to no pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PoolEvent {
    /// The container agent made the slot (left running: a claim asks nothing of Docker).
    Ready,
    /// It could not make it (it removed what there was).
    Failed,
    /// The slot's container and folders are gone.
    Removed,
}

impl PoolEvent {
    pub(super) fn of(event_type: &str) -> Option<PoolEvent> {
        match event_type {
            kind::CONTAINER_POOL_SLOT_READY => Some(PoolEvent::Ready),
            kind::CONTAINER_POOL_SLOT_FAILED => Some(PoolEvent::Failed),
            kind::CONTAINER_POOL_SLOT_REMOVED => Some(PoolEvent::Removed),
            _ => None,
        }
    }
}

/// What the keeper asks the container agent to do with one slot.
#[derive(Debug, Clone, Copy)]
enum SlotTask {
    Create,
    Remove,
}

/// What one slot of `pool:slots` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotState {
    Pending { since_ms: i64 },
    Free { since_ms: i64 },
    Claimed { thred: String },
}

impl SlotState {
    pub(crate) fn parse(text: &str) -> Option<SlotState> {
        let (kind, rest) = text.split_once(':')?;
        match kind {
            "pending" => Some(SlotState::Pending { since_ms: rest.parse().ok()? }),
            "free" => Some(SlotState::Free { since_ms: rest.parse().ok()? }),
            "claimed" if !rest.is_empty() => Some(SlotState::Claimed { thred: rest.to_owned() }),
            _ => None,
        }
    }
}

/// The slot a new thred claims in its commit: the one the service put in its context. `None` for
/// an existing thred (a claim happens once, at the start) and for a pattern without a pool.
pub(super) fn claimed_slot(pattern: &Pattern, previous: Option<&Thred>, thred: &Thred) -> Option<String> {
    let spec = pattern.start.pool.as_ref()?;
    if previous.is_some() || thred.ended {
        return None;
    }
    thred.context.get(&spec.context).and_then(Value::as_str).filter(|slot| !slot.is_empty()).map(str::to_owned)
}

/// What the keeper does in one round, decided from what it read (pure).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct KeeperPlan {
    /// New slots to ask the container agent for.
    pub create: usize,
    /// Free slots to take out and remove (too old, or no longer within the host's memory).
    pub retire: Vec<String>,
    /// Slots whose creation never answered: forgotten and removed.
    pub abandon: Vec<String>,
}

/// The pool's inputs for one round.
#[derive(Debug)]
pub(crate) struct PoolView<'a> {
    pub size: u32,
    pub max_idle_ms: i64,
    /// A slot still pending after this long is given up.
    pub pending_timeout_ms: i64,
    pub now_ms: i64,
    pub slots: &'a [(String, SlotState)],
    pub committed: Committed,
    pub need_memory_mib: u64,
    pub budget_memory_mib: u64,
}

/// Decides one round: retire what is too old or does not fit, abandon stuck creations, and create
/// what is missing up to `size`, as far as the memory budget left by live sessions allows.
pub(crate) fn plan(view: &PoolView<'_>) -> KeeperPlan {
    let mut plan = KeeperPlan::default();
    let mut free: Vec<(&str, i64)> = Vec::new();
    let mut pending = 0usize;
    for (slot, state) in view.slots {
        match state {
            SlotState::Pending { since_ms } if view.now_ms - since_ms > view.pending_timeout_ms => plan.abandon.push(slot.clone()),
            SlotState::Pending { .. } => pending += 1,
            SlotState::Free { since_ms } if view.max_idle_ms > 0 && view.now_ms - since_ms > view.max_idle_ms => {
                plan.retire.push(slot.clone())
            }
            SlotState::Free { since_ms } => free.push((slot, *since_ms)),
            SlotState::Claimed { .. } => {}
        }
    }
    // Sessions come first: the pool holds only memory no live session does.
    let room_mib = view.budget_memory_mib.saturating_sub(view.committed.memory_mib);
    let fitting = room_mib.checked_div(view.need_memory_mib).map_or(usize::MAX, |slots| slots as usize);
    let wanted = (view.size as usize).min(fitting);
    free.sort_by_key(|(_, since_ms)| *since_ms);
    while free.len() + pending > wanted && !free.is_empty() {
        let (oldest, _) = free.remove(0);
        plan.retire.push(oldest.to_owned());
    }
    let have = free.len() + pending;
    plan.create = wanted.saturating_sub(have).min(MAX_CREATING.saturating_sub(pending));
    plan
}

/// Marks a pending slot free (only if still pending: a slot given up meanwhile stays gone).
const SLOT_READY_SCRIPT: &str = r#"
-- KEYS: 1 slots hash, 2 free zset; ARGV: 1 slot, 2 now ms
local state = redis.call('HGET', KEYS[1], ARGV[1])
if state and string.sub(state, 1, 8) == 'pending:' then
  redis.call('HSET', KEYS[1], ARGV[1], 'free:' .. ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  return 'free'
end
return 'unknown'
"#;

/// The free slots of the warm pool of the engine whose Redis keys start with `redis_prefix`
/// (benchmarks wait for a full pool before measuring claims).
pub async fn free_pool_slots(redis_url: &str, redis_prefix: &str) -> Result<u64> {
    let client = redis::Client::open(redis_url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    Ok(connection.zcard(Keys::new(redis_prefix).pool_free()).await?)
}

/// Forgets the whole warm pool of that engine (a benchmark removes its slots' containers itself).
pub async fn clear_pool(redis_url: &str, redis_prefix: &str) -> Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys = Keys::new(redis_prefix);
    let _: () = connection.del(&[keys.pool_free(), keys.pool_slots()]).await?;
    Ok(())
}

impl Engine {
    fn pool_size(&self) -> u32 {
        self.inner.profile.pool_size()
    }

    /// A free slot for a new thred, other than those it already lost to another and those
    /// other events of this engine are trying; `None`: cold. A random one among the free, so
    /// racing replicas mostly pick different slots too.
    pub(super) async fn free_pool_slot(&self, taken: &[String]) -> Result<Option<TryingSlot>> {
        if self.pool_size() == 0 {
            return Ok(None);
        }
        let in_flight = &self.inner.slots_in_flight;
        let wanted = CANDIDATES + taken.len() + in_flight.len();
        let mut redis = self.inner.redis.clone();
        let candidates: Vec<String> =
            redis::cmd("ZRANDMEMBER").arg(self.inner.keys.pool_free()).arg(wanted).query_async(&mut redis).await?;
        Ok(candidates.into_iter().filter(|slot| !taken.contains(slot)).find_map(|slot| in_flight.try_take(slot)))
    }

    /// `container.pool_slot_ready`, `container.pool_slot_failed`, `container.pool_slot_removed` from the container agent.
    pub(super) async fn pool_event(&self, kind: PoolEvent, event: &CloudEvent) -> Result<EventFate> {
        let read = match kind {
            PoolEvent::Ready => event.data_as::<PoolSlotReady>().map(|data| (data.slot, String::new())),
            PoolEvent::Failed => event.data_as::<PoolSlotFailed>().map(|data| (data.slot, data.error)),
            PoolEvent::Removed => event.data_as::<PoolSlotRemoved>().map(|data| (data.slot, String::new())),
        };
        let (slot, error) = match read {
            Ok((slot, _)) if slot.is_empty() => return Ok(EventFate::Refused(format!("{} with an empty `slot`", event.event_type))),
            Ok(read) => read,
            Err(error) => return Ok(EventFate::Refused(error.to_string())),
        };
        let slot = slot.as_str();
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        match kind {
            PoolEvent::Ready => {
                let now_ms = self.inner.clock.now_ms();
                let outcome: String = redis::Script::new(SLOT_READY_SCRIPT)
                    .key(keys.pool_slots())
                    .key(keys.pool_free())
                    .arg(slot)
                    .arg(now_ms)
                    .invoke_async(&mut redis)
                    .await?;
                if outcome == "free" {
                    tracing::info!(slot, "pool slot free");
                } else {
                    // Given up while it was being made (or Redis lost it): nobody will claim it.
                    tracing::info!(slot, "a pool slot nobody waits for became ready; removing it");
                    self.send_pool_task(SlotTask::Remove, slot, &format!("late/{}", event.id)).await?;
                }
            }
            PoolEvent::Failed => {
                let state: Option<String> = redis.hget(keys.pool_slots(), slot).await?;
                if state.as_deref().and_then(SlotState::parse).is_some_and(|state| matches!(state, SlotState::Pending { .. })) {
                    let _: () = redis.hdel(keys.pool_slots(), slot).await?;
                }
                tracing::warn!(slot, error, "pool slot could not be made");
            }
            PoolEvent::Removed => tracing::debug!(slot, "pool slot removed"),
        }
        Ok(EventFate::Done)
    }

    /// Asks the container agent to make or remove `slot`'s container. The task id is derived from
    /// the slot and `cause`, so a keeper round that repeats itself sends the same task again.
    async fn send_pool_task(&self, what: SlotTask, slot: &str, cause: &str) -> Result<()> {
        let slot_id = match SessionId::parse(slot) {
            Ok(slot_id) => slot_id,
            Err(error) => {
                tracing::warn!(slot, %error, "pool slot's name is not an id; no task sent");
                return Ok(());
            }
        };
        let stable_id = |action: &str| {
            Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-pool/{}/{action}/{slot}/{cause}", self.inner.keys.prefix).as_bytes())
        };
        let task = match what {
            SlotTask::Create => Task::of(stable_id(ContainerPoolCreate::ACTION), None, &ContainerPoolCreate { slot: slot_id }),
            SlotTask::Remove => Task::of(stable_id(ContainerPoolRemove::ACTION), None, &ContainerPoolRemove { slot: slot_id }),
        };
        self.publish_messages(&[task_message(&self.inner.config, &task)?]).await
    }

    /// Runs the keeper until stopped (every `KEEPER_INTERVAL`); a failed round is logged and
    /// the next one tries again. Several replicas may run it: each step is a single Redis command
    /// or script whose loser does nothing, so two keepers at most ask for a few slots too many,
    /// which the next round retires.
    pub(super) async fn keep_pool_forever(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let has_pool = self.inner.patterns.iter().any(|pattern| pattern.start.pool.is_some());
        let mut free_after_last_round: Option<usize> = None;
        loop {
            if has_pool {
                if let Err(error) = self.keep_pool(&mut free_after_last_round).await {
                    tracing::warn!(%error, "warm pool round failed; retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(KEEPER_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One round. `free_after_last_round`: the free slots the previous round left; fewer now means
    /// opens are claiming right now, and making containers would take the host's CPU from them,
    /// so the refill waits for a round in which none was claimed.
    async fn keep_pool(&self, free_after_last_round: &mut Option<usize>) -> Result<()> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let (stored, memory): (Vec<(String, String)>, Option<u64>) =
            redis::pipe().hgetall(keys.pool_slots()).hget(keys.capacity(), "memory").query_async(&mut redis).await?;
        let slots: Vec<(String, SlotState)> =
            stored.iter().filter_map(|(slot, text)| Some((slot.clone(), SlotState::parse(text)?))).collect();
        // Claims of threds that ended (or are gone): their containers went with their sessions.
        let claims: Vec<(String, String)> = slots
            .iter()
            .filter_map(|(slot, state)| match state {
                SlotState::Claimed { thred } => Some((slot.clone(), thred.clone())),
                _ => None,
            })
            .collect();
        if !claims.is_empty() {
            let ids: Vec<String> = claims.iter().map(|(_, thred)| thred.clone()).collect();
            let live: Vec<Thred> = self.load_threds(&ids).await?.into_iter().filter(|thred| !thred.ended).collect();
            for (slot, thred) in &claims {
                if live.iter().any(|candidate| &candidate.id == thred) {
                    continue;
                }
                let forgotten: u64 = redis::cmd("HDEL").arg(keys.pool_slots()).arg(slot).query_async(&mut redis).await?;
                if forgotten > 0 {
                    tracing::info!(slot, thred, "claim of an ended session forgotten");
                    // Its container went with the session (whose tasks find it through the claim);
                    // this removes the slot's container if the claim never reached it (a claimed
                    // one is left to its session's exit, or to reconciliation if that is gone).
                    self.send_pool_task(SlotTask::Remove, slot, &format!("ended/{thred}")).await?;
                }
            }
        }
        let settings = self.inner.profile.pool.as_ref();
        let capacity = &self.inner.capacity;
        let view = PoolView {
            size: self.pool_size(),
            max_idle_ms: settings.map_or(0, |pool| pool.max_idle_secs as i64 * 1000),
            pending_timeout_ms: (self.inner.profile.container.ready_timeout_secs as i64 * 3 + 30) * 1000,
            now_ms: self.inner.clock.now_ms(),
            slots: &slots,
            committed: Committed { memory_mib: memory.unwrap_or(0), cpu_millis: 0 },
            need_memory_mib: capacity.need_memory_mib,
            budget_memory_mib: capacity.budget_memory_mib,
        };
        let mut plan = plan(&view);
        let free_now = slots.iter().filter(|(_, state)| matches!(state, SlotState::Free { .. })).count();
        if free_after_last_round.is_some_and(|last| free_now < last) {
            plan.create = 0;
        }
        *free_after_last_round = Some(free_now.saturating_sub(plan.retire.len()));
        for slot in &plan.retire {
            // Out of the free set first: whoever removes it there owns it, and no open can claim it.
            let taken: u64 = redis.zrem(keys.pool_free(), slot).await?;
            if taken > 0 {
                let _: () = redis.hdel(keys.pool_slots(), slot).await?;
                tracing::info!(slot, "pool slot retired");
                self.send_pool_task(SlotTask::Remove, slot, "retired").await?;
            }
        }
        for slot in &plan.abandon {
            let _: () = redis.hdel(keys.pool_slots(), slot).await?;
            tracing::warn!(slot, "pool slot never became ready; given up");
            self.send_pool_task(SlotTask::Remove, slot, "abandoned").await?;
        }
        for _ in 0..plan.create {
            let slot = Uuid::now_v7().simple().to_string();
            let _: () = redis.hset(keys.pool_slots(), &slot, format!("pending:{}", view.now_ms)).await?;
            self.send_pool_task(SlotTask::Create, &slot, "create").await?;
        }
        if plan.create > 0 {
            tracing::debug!(created = plan.create, "pool slots asked for");
        }
        Ok(())
    }

    /// The container inventory's pool containers: one Redis does not know (older than the grace
    /// period, so not one being made right now) or a free one that is no longer alive is removed.
    /// Claimed ones are the sessions' (the inventory names their session) and reconciled as such.
    pub(super) async fn reconcile_pool(&self, entries: &[Value], event: &CloudEvent) -> Result<()> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let now = self.inner.clock.now();
        let grace = chrono::Duration::seconds(self.inner.config.orphan_grace_secs as i64);
        for entry in entries {
            let Some(slot) = entry.get("pool_slot").and_then(Value::as_str) else { continue };
            if entry.get("session").and_then(Value::as_str).is_some_and(|session| !session.is_empty()) {
                continue;
            }
            let state: Option<String> = redis.hget(keys.pool_slots(), slot).await?;
            let alive = matches!(entry.get("state").and_then(Value::as_str), Some("running" | "paused" | "created"));
            match state.as_deref().and_then(SlotState::parse) {
                None => {
                    let young = entry.get("created").and_then(super::created_time).is_some_and(|created| now - created < grace);
                    if young {
                        continue;
                    }
                    tracing::info!(slot, "pool container the pool does not know; removing it");
                    self.send_pool_task(SlotTask::Remove, slot, &format!("unknown/{}", event.id)).await?;
                }
                Some(SlotState::Free { .. }) if !alive => {
                    let taken: u64 = redis.zrem(keys.pool_free(), slot).await?;
                    if taken > 0 {
                        let _: () = redis.hdel(keys.pool_slots(), slot).await?;
                        tracing::warn!(slot, "free pool container died; replacing it");
                        self.send_pool_task(SlotTask::Remove, slot, &format!("dead/{}", event.id)).await?;
                    }
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(slot: &str, since_ms: i64) -> (String, SlotState) {
        (slot.to_owned(), SlotState::Free { since_ms })
    }

    fn pending(slot: &str, since_ms: i64) -> (String, SlotState) {
        (slot.to_owned(), SlotState::Pending { since_ms })
    }

    #[track_caller]
    fn check(slots: &[(String, SlotState)], committed_mib: u64, expected: KeeperPlan) {
        let view = PoolView {
            size: 3,
            max_idle_ms: 60_000,
            pending_timeout_ms: 90_000,
            now_ms: 100_000,
            slots,
            committed: Committed { memory_mib: committed_mib, cpu_millis: 0 },
            need_memory_mib: 100,
            budget_memory_mib: 1000,
        };
        assert_eq!(plan(&view), expected);
    }

    #[test]
    fn the_keeper_fills_retires_and_gives_up_within_the_budget() {
        // Empty: three made, in one round.
        check(&[], 0, KeeperPlan { create: 3, ..KeeperPlan::default() });
        // Pending slots count: only what is missing is asked for.
        check(&[pending("a", 99_000), free("b", 90_000)], 0, KeeperPlan { create: 1, ..KeeperPlan::default() });
        // A free slot older than max_idle is replaced; a pending one stuck too long is given up.
        check(
            &[free("old", 10_000), pending("stuck", 5_000), free("b", 90_000)],
            0,
            KeeperPlan { create: 2, retire: vec!["old".into()], abandon: vec!["stuck".into()] },
        );
        // Claimed slots are the sessions': they neither count nor go.
        check(
            &[(String::from("c"), SlotState::Claimed { thred: "t".into() }), free("b", 90_000)],
            0,
            KeeperPlan { create: 2, ..KeeperPlan::default() },
        );
        // Sessions hold 800 of 1000 MiB: two slots fit; the oldest free one beyond that goes.
        check(
            &[free("x", 80_000), free("y", 85_000), free("z", 90_000)],
            800,
            KeeperPlan { create: 0, retire: vec!["x".into()], ..KeeperPlan::default() },
        );
        // A full host: no slot at all.
        check(&[], 1000, KeeperPlan::default());
    }

    #[test]
    fn slot_states_round_trip_and_garbage_is_skipped() {
        assert_eq!(SlotState::parse("pending:12"), Some(SlotState::Pending { since_ms: 12 }));
        assert_eq!(SlotState::parse("free:5"), Some(SlotState::Free { since_ms: 5 }));
        assert_eq!(SlotState::parse("claimed:t-1"), Some(SlotState::Claimed { thred: "t-1".into() }));
        for garbage in ["", "free", "free:x", "claimed:", "other:1"] {
            assert_eq!(SlotState::parse(garbage), None, "{garbage}");
        }
    }

    #[test]
    fn a_slot_in_flight_is_skipped_until_its_attempt_is_over() {
        let in_flight = SlotsInFlight::default();
        let first = in_flight.try_take("a".to_owned()).expect("a free slot is taken");
        assert!(in_flight.try_take("a".to_owned()).is_none(), "a slot another open tries is skipped");
        let other = in_flight.try_take("b".to_owned()).expect("another slot is taken");
        assert_eq!((first.name(), other.name(), in_flight.len()), ("a", "b", 2));
        drop(first);
        assert_eq!(in_flight.len(), 1);
        assert!(in_flight.try_take("a".to_owned()).is_some(), "free again once its attempt is over");
    }
}
