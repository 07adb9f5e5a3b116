//! The engine's Redis store: the commit script (a thred's new state, its dedupe marker, indexes,
//! timers and outbox in one atomic step with an optimistic version check), the read-only script
//! binding reads with, thred reads, and the connection (with its reconnect policy).

use std::time::Duration;

use protocol::{backoff, CloudEvent};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde_json::Value;

use super::admission::{AdmissionRead, OPENS_WINDOW_MS};
use super::binding::BindingRead;
use super::hosts::READ_HOSTS_LUA;
use super::keys::SEEN_BUCKET_TTL_SECS;
use super::{pool, Engine, OutboxMessage};
use crate::admission;
use crate::core::{Effect, Step, Thred};
use crate::pattern::Pattern;
use crate::placement::HostView;
use crate::timers::TimerMember;
use crate::usage::Budget;
use crate::{Error, Result};

/// The commit: new thred state, dedupe marker, live-key index, timers and outbox in one step.
pub(super) const COMMIT_SCRIPT: &str = r#"
-- KEYS: 1 thred, 2 seen today, 3 seen yesterday, 4 outbox, 5 outbox index, 6 live index, 7 deadlines,
--       8 ended index, 9 exclusive owner (when ARGV[12] is '1'), 10 the user's live threds,
--       11 committed capacity (hash), 12 the admission queue (when ARGV[14] is '1'),
--       13 the warm pool's free slots (zset), 14 the pool's slots (hash), 15 the user's opens (zset)
-- ARGV: 1 expected version, 2 thred json, 3 new version, 4 ended, 5 thred id, 6 max live (0 = not new),
--       7 event id, 8 seen set ttl, 9 outbox json, 10 timer key prefix, 11 now ms, 12 owns an
--       exclusive key, 13 the fired timer this event is ('' = none), 14 admitted pattern, 15 live
--       threds a user may have, 16 memory and 17 cpu (millis) a thred holds, 18 memory and 19 cpu
--       budget, 20 held capacity before, 21 holds it after, 22 queued after, 23 the pool slot a
--       new thred claims ('' = none), 24 opens a user may make in the window, 25 the window's start
--       (ms, exclusive), then the timers to start (count, then member, deadline ms, ttl ms each) and
--       to cancel (count, then members)
-- Every check comes before the first write, so a refused commit changes nothing.
if redis.call('SISMEMBER', KEYS[2], ARGV[7]) == 1 or redis.call('SISMEMBER', KEYS[3], ARGV[7]) == 1 then
  return 'duplicate'
end
local version = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if version ~= tonumber(ARGV[1]) then return 'conflict' end
local max_live = tonumber(ARGV[6])
local is_new = max_live > 0
if is_new and redis.call('SCARD', KEYS[6]) >= max_live then return 'conflict' end
-- The owner key exists exactly while its owner is live, so a new thred may take it only if unset.
if ARGV[12] == '1' and is_new and redis.call('EXISTS', KEYS[9]) == 1 then return 'conflict' end
local admitted = ARGV[14] == '1'
local held_before, holds_after = ARGV[20] == '1', ARGV[21] == '1'
if admitted then
  if is_new and ARGV[4] ~= '1' and redis.call('SCARD', KEYS[10]) >= tonumber(ARGV[15]) then return 'limit' end
  -- A new thred that takes or waits for capacity counts against the user's opens in the window
  -- (this one once, by event id), as the verdict read them.
  if is_new and (ARGV[21] == '1' or ARGV[22] == '1') then
    local opens = redis.call('ZCOUNT', KEYS[15], '(' .. ARGV[25], '+inf')
    if not redis.call('ZSCORE', KEYS[15], ARGV[7]) then opens = opens + 1 end
    if opens > tonumber(ARGV[24]) then return 'rate' end
  end
  if holds_after and not held_before then
    -- First come, first served: only the oldest waiting thred (or anyone, if none waits) takes capacity.
    local head = redis.call('ZRANGE', KEYS[12], 0, 0)
    if head[1] and head[1] ~= ARGV[5] then return 'full' end
    local held = redis.call('HMGET', KEYS[11], 'memory', 'cpu')
    local memory, cpu = tonumber(held[1] or '0'), tonumber(held[2] or '0')
    if memory + tonumber(ARGV[16]) > tonumber(ARGV[18]) or cpu + tonumber(ARGV[17]) > tonumber(ARGV[19]) then return 'full' end
  end
end
-- A slot is claimed by exactly one thred: the one whose commit takes it out of the free set.
if ARGV[23] ~= '' and not redis.call('ZSCORE', KEYS[13], ARGV[23]) then return 'slot_taken' end
if ARGV[12] == '1' and is_new then redis.call('SET', KEYS[9], ARGV[5]) end
if ARGV[23] ~= '' then
  redis.call('ZREM', KEYS[13], ARGV[23])
  redis.call('HSET', KEYS[14], ARGV[23], 'claimed:' .. ARGV[5])
end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'json', ARGV[2])
if ARGV[4] == '1' then
  redis.call('SREM', KEYS[6], ARGV[5])
  redis.call('ZADD', KEYS[8], ARGV[11], ARGV[5])
  if ARGV[12] == '1' and redis.call('GET', KEYS[9]) == ARGV[5] then redis.call('DEL', KEYS[9]) end
else
  redis.call('SADD', KEYS[6], ARGV[5])
end
if admitted then
  if ARGV[4] == '1' then redis.call('SREM', KEYS[10], ARGV[5]) else redis.call('SADD', KEYS[10], ARGV[5]) end
  if holds_after and not held_before then
    redis.call('HINCRBY', KEYS[11], 'memory', ARGV[16])
    redis.call('HINCRBY', KEYS[11], 'cpu', ARGV[17])
  elseif held_before and not holds_after then
    redis.call('HINCRBY', KEYS[11], 'memory', -tonumber(ARGV[16]))
    redis.call('HINCRBY', KEYS[11], 'cpu', -tonumber(ARGV[17]))
  end
  if ARGV[22] == '1' then redis.call('ZADD', KEYS[12], 'NX', ARGV[11], ARGV[5]) else redis.call('ZREM', KEYS[12], ARGV[5]) end
  -- Every new thred admission decided on is an open of its user, refused ones included.
  if is_new then
    redis.call('ZADD', KEYS[15], 'NX', ARGV[11], ARGV[7])
    redis.call('ZREMRANGEBYSCORE', KEYS[15], '-inf', ARGV[25])
    redis.call('EXPIRE', KEYS[15], 120)
  end
end
-- A timer leaves the deadline index only with the commit of the event it fired.
if ARGV[13] ~= '' then redis.call('ZREM', KEYS[7], ARGV[13]) end
redis.call('SADD', KEYS[2], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[8])
if ARGV[9] ~= '' then
  redis.call('SET', KEYS[4], ARGV[9])
  redis.call('SADD', KEYS[5], KEYS[4])
end
local i = 26
local starts = tonumber(ARGV[i]); i = i + 1
for _ = 1, starts do
  redis.call('SET', ARGV[10] .. ARGV[i], '1', 'PX', ARGV[i + 2])
  redis.call('ZADD', KEYS[7], ARGV[i + 1], ARGV[i])
  i = i + 3
end
local cancels = tonumber(ARGV[i]); i = i + 1
for _ = 1, cancels do
  redis.call('DEL', ARGV[10] .. ARGV[i])
  redis.call('ZREM', KEYS[7], ARGV[i])
  i = i + 1
end
return 'ok'
"#;

pub(super) enum CommitResult {
    Committed,
    Duplicate,
    Conflict,
    /// The user already has as many live threds as the limits allow.
    UserLimit,
    /// The capacity is taken, or an older thred waits for it.
    Full,
    /// The warm-pool slot this new thred was to claim went to another one first.
    SlotTaken,
    /// The user opened as many sessions in the window as the limits allow.
    RateLimit,
}

/// Reads what binding needs in one round trip, and with it what a new thred needs (its exclusive
/// owner, admission's counts, the hosts, the budgets spent) when the event starts a pattern: the
/// engine starts the would-be thred before reading, so one round trip serves the whole attempt.
/// Nothing is written: the commit checks all of it again, atomically.
pub(super) const BIND_READ_SCRIPT: &str = r#"
-- KEYS: 1 seen today, 2 seen yesterday, 3 live index of the subject; for a would-be thred: 4 its
--       exclusive owner key, 5 the user's opens, 6 the user's live threds, 7 capacity of no host,
--       8 the queue, 9 hosts, 10 draining, 11 the user's usage today, 12 this month
-- ARGV: 1 event id, 2 thred key prefix, 3 thred id from the event ('' = none), 4 what to read for
--       the would-be thred ('' = nothing; 'e' its owner, 'a' admission, 'b' budgets), 5 its thred id,
--       6 the opens window's start (ms, exclusive), 7 host report key prefix, 8 host capacity key prefix
-- Reply: {1} if seen; else {0, the named thred's json (or ''), {the live threds' json}, the
--        owner's json (or nil), admission {opens, user live, memory, cpu, queued} (or nil),
--        read_hosts' reply (or nil), {cost today, cost this month} (or nil)}.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 or redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return {1}
end
local named = ''
if ARGV[3] ~= '' then
  named = redis.call('HGET', ARGV[2] .. ARGV[3], 'json') or ''
end
local live = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local json = redis.call('HGET', ARGV[2] .. id, 'json')
  if json then table.insert(live, json) end
end
local reply = {0, named, live, false, false, false, false}
local wants = ARGV[4]
if string.find(wants, 'e', 1, true) then
  local owner = redis.call('GET', KEYS[4])
  if owner and owner ~= ARGV[5] then reply[4] = redis.call('HGET', ARGV[2] .. owner, 'json') end
end
if string.find(wants, 'a', 1, true) then
  -- The window as the commit will leave it: this open counts once whether or not it is recorded yet.
  local opens = redis.call('ZCOUNT', KEYS[5], '(' .. ARGV[6], '+inf')
  if not redis.call('ZSCORE', KEYS[5], ARGV[1]) then opens = opens + 1 end
  local held = redis.call('HMGET', KEYS[7], 'memory', 'cpu')
  reply[5] = {opens, redis.call('SCARD', KEYS[6]), held[1], held[2], redis.call('ZCARD', KEYS[8])}
  reply[6] = read_hosts(KEYS[9], KEYS[10], ARGV[7], ARGV[8])
end
if string.find(wants, 'b', 1, true) then
  reply[7] = {redis.call('HGET', KEYS[11], 'cost'), redis.call('HGET', KEYS[12], 'cost')}
end
return reply
"#;

/// The bind read with the `read_hosts` function it calls.
pub(super) fn bind_read_script() -> String {
    format!("{READ_HOSTS_LUA}\n{BIND_READ_SCRIPT}")
}

/// What the bind read found beyond binding, for a would-be thred (see [`BIND_READ_SCRIPT`]).
#[derive(Default)]
pub(super) struct StartRead {
    /// The live thred that owns what the would-be thred would own exclusively, if another one does.
    pub(super) owner: Option<Thred>,
    /// Admission's counts and the hosts, for a pattern with admission.
    pub(super) admission: Option<AdmissionRead>,
}

/// The `timer.fired` event's entry in the deadline index, which stays there until the event is
/// committed (or found to need nothing), so a lost `timer.fired` is fired again by the sweep.
pub(super) fn fired_timer_member(event: &CloudEvent) -> Option<String> {
    if event.event_type != crate::pattern::TIMER_FIRED {
        return None;
    }
    let thred_id = event.extension("thredid")?;
    let key = event.subject.as_deref()?;
    let timer = event.data.get("timer")?.as_str()?;
    let generation = event.data.get("generation")?.as_u64()?;
    Some(TimerMember::new(thred_id, generation, timer, key).encode())
}

/// How the Redis connection comes back after Redis restarts. redis-rs 0.27 hands `factor` to its
/// backoff as the growth factor (default 100, on a 1 s minimum): the second reconnect attempt
/// waited 60-120 s, and every event waited with it (found by the faults matrix: a 3 s Redis
/// restart stalled the engine for two minutes). A factor of 2 capped at 1 s retries every second;
/// the timeouts keep a command on a dead connection from hanging.
fn redis_reconnect_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_factor(2)
        .set_max_delay(1000)
        .set_number_of_retries(10)
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(10))
}

/// Connects to Redis, retrying with backoff for a minute: in a compose stack Redis may start later.
pub(super) async fn connect_redis(client: &redis::Client) -> Result<ConnectionManager> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let cap = Duration::from_secs(5);
    let mut delays = backoff::doubling(Duration::from_millis(100), cap);
    loop {
        match client.get_connection_manager_with_config(redis_reconnect_config()).await {
            Ok(connection) => return Ok(connection),
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error.into()),
            Err(error) => {
                let delay = backoff::next_delay(&mut delays, cap);
                tracing::warn!(%error, retry_in = ?delay, "redis not reachable");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl Engine {
    /// A `timer.fired` that needed no commit (stale, ignored, already applied) leaves the deadline
    /// index now; one that was committed left it in the commit.
    pub(super) async fn forget_fired_timer(&self, event: &CloudEvent) -> Result<()> {
        if let Some(member) = fired_timer_member(event) {
            let mut redis = self.inner.redis.clone();
            let _: () = redis.zrem(self.inner.keys.deadlines(), member).await?;
        }
        Ok(())
    }

    pub(super) async fn queue_length(&self, pattern: &Pattern) -> Result<u64> {
        let mut redis = self.inner.redis.clone();
        Ok(redis.zcard(self.inner.keys.queue(&pattern.name)).await?)
    }

    pub(super) async fn load_thred(&self, thred_id: &str) -> Result<Option<Thred>> {
        let mut redis = self.inner.redis.clone();
        let key = self.inner.keys.thred(thred_id);
        let stored: Option<String> = redis.hget(&key, "json").await?;
        let Some(text) = stored else { return Ok(None) };
        let thred: Thred = serde_json::from_str(&text).map_err(|error| Error::Corrupt { key, reason: error.to_string() })?;
        Ok(Some(thred))
    }

    /// Live threds of a key, newest first.
    pub async fn live_threds(&self, key: &str) -> Result<Vec<Thred>> {
        let mut redis = self.inner.redis.clone();
        let ids: Vec<String> = redis.smembers(self.inner.keys.live(key)).await?;
        self.load_threds(&ids).await
    }

    /// Every live thred of `pattern`, found through its per-user live sets (what the drain and the
    /// failover walk).
    pub(super) async fn live_threds_of(&self, pattern: &Pattern) -> Result<Vec<Thred>> {
        let mut redis = self.inner.redis.clone();
        let user_prefix = self.inner.keys.user_live(&pattern.name, "");
        let mut user_keys: Vec<String> = Vec::new();
        {
            let mut scan: redis::AsyncIter<String> = redis.scan_match(format!("{user_prefix}*")).await?;
            while let Some(key) = futures::StreamExt::next(&mut scan).await {
                user_keys.push(key);
            }
        }
        let mut threds = Vec::new();
        for user_key in user_keys {
            let ids: Vec<String> = redis.smembers(&user_key).await?;
            threds.extend(self.load_threds(&ids).await?);
        }
        Ok(threds)
    }

    /// Threds by id in one round trip, newest first; ids without a record are skipped.
    pub(super) async fn load_threds(&self, ids: &[String]) -> Result<Vec<Thred>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        for id in ids {
            pipeline.hget(self.inner.keys.thred(id), "json");
        }
        let mut redis = self.inner.redis.clone();
        let stored: Vec<Option<String>> = pipeline.query_async(&mut redis).await?;
        let mut threds = Vec::new();
        for (id, text) in ids.iter().zip(stored) {
            let Some(text) = text else { continue };
            let thred: Thred = serde_json::from_str(&text)
                .map_err(|error| Error::Corrupt { key: self.inner.keys.thred(id), reason: error.to_string() })?;
            threds.push(thred);
        }
        threds.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then_with(|| b.id.cmp(&a.id)));
        Ok(threds)
    }

    /// Reads one thred (tests and tools).
    pub async fn thred(&self, thred_id: &str) -> Result<Option<Thred>> {
        self.load_thred(thred_id).await
    }

    /// One round trip (a read-only script) for everything binding needs: whether the event was
    /// seen, the thred its `thredid` names, and the live threds of its subject; and, for
    /// `candidate` (the thred the event would start, already started), its exclusive owner and
    /// what admission decides on. `None` = seen.
    pub(super) async fn read_for_binding(
        &self,
        event: &CloudEvent,
        candidate: Option<(&Pattern, &Thred)>,
    ) -> Result<Option<(BindingRead, StartRead)>> {
        let keys = &self.inner.keys;
        let now = self.inner.clock.now();
        let now_ms = now.timestamp_millis();
        let (seen_today, seen_yesterday) = keys.seen(now_ms);
        let mut invocation = self.inner.bind_read.prepare_invoke();
        invocation
            .key(&seen_today)
            .key(&seen_yesterday)
            .key(keys.live(event.subject.as_deref().unwrap_or_default()))
            .arg(&event.id)
            .arg(keys.thred(""))
            .arg(event.extension("thredid").unwrap_or_default());
        match candidate {
            None => {
                invocation.arg("");
            }
            Some((pattern, thred)) => {
                let user = thred.context.get("user").and_then(Value::as_str).unwrap_or_default();
                let mut wants = String::new();
                if thred.exclusive.is_some() {
                    wants.push('e');
                }
                if pattern.start.admission.is_some() {
                    wants.push('a');
                    if self.inner.rates.has_budgets() {
                        wants.push('b');
                    }
                }
                invocation
                    .key(keys.exclusive(&pattern.name, thred.exclusive.as_deref().unwrap_or_default()))
                    .key(keys.user_opens(&pattern.name, user))
                    .key(keys.user_live(&pattern.name, user))
                    .key(keys.capacity())
                    .key(keys.queue(&pattern.name))
                    .key(keys.hosts())
                    .key(keys.draining())
                    .key(keys.usage(user, &Budget::Daily.period(now)))
                    .key(keys.usage(user, &Budget::Monthly.period(now)))
                    .arg(wants)
                    .arg(&thred.id)
                    .arg(now_ms - OPENS_WINDOW_MS)
                    .arg(keys.host_report_prefix())
                    .arg(keys.capacity_of(Some("")));
            }
        }
        let mut redis = self.inner.redis.clone();
        let reply: Vec<redis::Value> = invocation.invoke_async(&mut redis).await?;
        if reply.first().and_then(|seen| redis::from_redis_value::<i64>(seen).ok()) != Some(0) {
            return Ok(None);
        }
        let parse = |text: &str| -> Result<Option<Thred>> {
            if text.is_empty() {
                return Ok(None);
            }
            serde_json::from_str(text).map(Some).map_err(|error| Error::Corrupt { key: keys.thred("?"), reason: error.to_string() })
        };
        let text = |value: Option<&redis::Value>| -> Result<String> {
            Ok(match value {
                None | Some(redis::Value::Nil) => String::new(),
                Some(value) => redis::from_redis_value(value)?,
            })
        };
        let named = parse(&text(reply.get(1))?)?;
        let live_texts: Vec<String> = match reply.get(2) {
            Some(value) => redis::from_redis_value(value)?,
            None => Vec::new(),
        };
        let mut live = Vec::new();
        for text in &live_texts {
            if let Some(thred) = parse(text)? {
                live.push(thred);
            }
        }
        live.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then_with(|| b.id.cmp(&a.id)));
        let mut start = StartRead::default();
        if let Some((_, thred)) = candidate {
            start.owner = parse(&text(reply.get(3))?)?.filter(|owner| !owner.ended);
            if let Some(counts @ redis::Value::Array(_)) = reply.get(4) {
                let hosts: Vec<redis::Value> = match reply.get(5) {
                    Some(value @ redis::Value::Array(_)) => redis::from_redis_value(value)?,
                    _ => Vec::new(),
                };
                start.admission = Some(AdmissionRead::of(counts, &hosts, reply.get(6).unwrap_or(&redis::Value::Nil), thred)?);
            }
        }
        Ok(Some((BindingRead { named, live }, start)))
    }

    pub(super) async fn commit(
        &self,
        previous: Option<&Thred>,
        step: &Step,
        pattern: &Pattern,
        event: &CloudEvent,
        messages: &[OutboxMessage],
        placed: Option<&HostView>,
    ) -> Result<CommitResult> {
        let keys = &self.inner.keys;
        let mut thred = step.thred.clone();
        let expected_version = previous.map(|thred| thred.version);
        let expected = expected_version.unwrap_or(0);
        thred.version = expected + 1;
        let thred_json = serde_json::to_string(&thred).map_err(|source| Error::Encode { what: "thred", source })?;
        // An empty outbox is stored as no outbox (the commit script skips it), never a failed encoding.
        let outbox_json = if messages.is_empty() {
            String::new()
        } else {
            serde_json::to_string(messages).map_err(|source| Error::Encode { what: "outbox", source })?
        };
        let max_live = if expected_version.is_none() { pattern.start.max_live_per_key } else { 0 };
        let now_ms = self.inner.clock.now_ms();
        let (seen_today, seen_yesterday) = keys.seen(now_ms);
        let mut invocation = self.inner.commit.prepare_invoke();
        invocation
            .key(keys.thred(&thred.id))
            .key(&seen_today)
            .key(&seen_yesterday)
            .key(keys.outbox(&event.id))
            .key(keys.outboxes())
            .key(keys.live(&thred.key))
            .key(keys.deadlines())
            .key(keys.ended())
            .key(keys.exclusive(&pattern.name, thred.exclusive.as_deref().unwrap_or_default()))
            .key(keys.user_live(&pattern.name, thred.context.get("user").and_then(Value::as_str).unwrap_or_default()))
            .key(keys.capacity_of(thred.host.as_deref()))
            .key(keys.queue(&pattern.name))
            .key(keys.pool_free())
            .key(keys.pool_slots())
            .key(keys.user_opens(&pattern.name, thred.context.get("user").and_then(Value::as_str).unwrap_or_default()))
            .arg(expected)
            .arg(&thred_json)
            .arg(thred.version)
            .arg(if thred.ended { "1" } else { "0" })
            .arg(&thred.id)
            .arg(max_live)
            .arg(&event.id)
            .arg(SEEN_BUCKET_TTL_SECS)
            .arg(&outbox_json)
            .arg(keys.timer_prefix())
            .arg(now_ms)
            .arg(if thred.exclusive.is_some() { "1" } else { "0" })
            .arg(fired_timer_member(event).unwrap_or_default());
        let capacity = &self.inner.capacity;
        let flag = |on: bool| if on { "1" } else { "0" };
        match &pattern.start.admission {
            Some(spec) => {
                let held_before = previous.is_some_and(|previous| admission::holds_capacity(spec, previous));
                invocation
                    .arg("1")
                    .arg(capacity.max_sessions_per_user)
                    .arg(capacity.need_memory_mib)
                    .arg(capacity.need_cpu_millis)
                    .arg(placed.map_or(capacity.budget_memory_mib, |host| host.budget_memory_mib))
                    .arg(placed.map_or(capacity.budget_cpu_millis, |host| host.budget_cpu_millis))
                    .arg(flag(held_before))
                    .arg(flag(admission::holds_capacity(spec, &thred)))
                    .arg(flag(admission::is_queued(spec, &thred)));
            }
            None => {
                invocation.arg("0").arg(0).arg(0).arg(0).arg(0).arg(0).arg("0").arg("0").arg("0");
            }
        }
        invocation.arg(pool::claimed_slot(pattern, previous, &thred).unwrap_or_default());
        invocation.arg(capacity.max_opens_per_minute).arg(now_ms - OPENS_WINDOW_MS);
        let starts: Vec<(String, i64)> = step
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::StartTimer { timer, generation, deadline_ms } => {
                    Some((TimerMember::new(&thred.id, *generation, timer, &thred.key).encode(), *deadline_ms))
                }
                _ => None,
            })
            .collect();
        let cancels: Vec<String> = step
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::CancelTimer { timer, generation } => Some(TimerMember::new(&thred.id, *generation, timer, &thred.key).encode()),
                _ => None,
            })
            .collect();
        invocation.arg(starts.len());
        for (member, deadline_ms) in &starts {
            invocation.arg(member).arg(deadline_ms).arg((deadline_ms - now_ms).max(1));
        }
        invocation.arg(cancels.len());
        for member in &cancels {
            invocation.arg(member);
        }
        let mut redis = self.inner.redis.clone();
        let result: String = invocation.invoke_async(&mut redis).await?;
        if result == "ok" && !starts.is_empty() {
            self.inner.timer_wake.notify_one();
        }
        Ok(match result.as_str() {
            "ok" => CommitResult::Committed,
            "duplicate" => CommitResult::Duplicate,
            "limit" => CommitResult::UserLimit,
            "full" => CommitResult::Full,
            "slot_taken" => CommitResult::SlotTaken,
            "rate" => CommitResult::RateLimit,
            _ => CommitResult::Conflict,
        })
    }
}
