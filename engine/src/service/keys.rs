//! Redis key names under one prefix: every key the engine, the timer service, the exporter and
//! the host tools read or write is named here (the warm pool's in `pool`).

use protocol::AgentKind;

/// Dedupe markers live in one set per day (checked: today's and yesterday's), so an event id is
/// recognised for at least a day. One set per day rather than one key per event with its own TTL:
/// thousands of keys with a TTL slow down Redis's expiry of the timer keys, whose notifications
/// must come on time.
const SEEN_BUCKET_MS: i64 = 24 * 3600 * 1000;
pub(super) const SEEN_BUCKET_TTL_SECS: u64 = 3 * 24 * 3600;

/// Redis key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_owned() }
    }
    pub fn thred(&self, thred_id: &str) -> String {
        format!("{}:thred:{thred_id}", self.prefix)
    }
    pub fn live(&self, key: &str) -> String {
        format!("{}:live:{key}", self.prefix)
    }
    /// The dedupe sets to check at `now_ms`: today's (written) and yesterday's.
    pub fn seen(&self, now_ms: i64) -> (String, String) {
        let day = now_ms.div_euclid(SEEN_BUCKET_MS);
        (format!("{}:seen:{day}", self.prefix), format!("{}:seen:{}", self.prefix, day - 1))
    }
    /// Ended threds by end time, purged after [`super::ENDED_THRED_RETENTION_MS`].
    pub fn ended(&self) -> String {
        format!("{}:ended", self.prefix)
    }
    pub fn outbox(&self, event_id: &str) -> String {
        format!("{}:outbox:{event_id}", self.prefix)
    }
    pub fn outboxes(&self) -> String {
        format!("{}:outboxes", self.prefix)
    }
    pub fn deadlines(&self) -> String {
        format!("{}:deadlines", self.prefix)
    }
    pub fn timer_prefix(&self) -> String {
        format!("{}:timer:", self.prefix)
    }
    /// The live threds (ids) of one user, for `max_sessions_per_user`.
    pub fn user_live(&self, pattern: &str, user: &str) -> String {
        format!("{}:user-live:{pattern}:{user}", self.prefix)
    }
    /// New threds one user started (event id → ms), a sliding minute for
    /// `max_opens_per_user_per_minute`.
    pub fn user_opens(&self, pattern: &str, user: &str) -> String {
        format!("{}:user-opens:{pattern}:{user}", self.prefix)
    }
    /// Memory (MiB) and CPU (millis) held by live threds: hash fields `memory`, `cpu`.
    pub fn capacity(&self) -> String {
        format!("{}:capacity", self.prefix)
    }
    /// What live threds placed on `host` hold (like [`Keys::capacity`], which holds what threds
    /// placed on no host hold: those started before any host reported).
    pub fn capacity_of(&self, host: Option<&str>) -> String {
        match host {
            Some(host) => format!("{}:capacity:{host}", self.prefix),
            None => self.capacity(),
        }
    }
    /// The latest report of one host's agent (`container`, `workspace`), kept with a TTL: the host
    /// is gone once its container report has expired.
    pub fn host_report(&self, host: &str, agent: AgentKind) -> String {
        format!("{}{host}:{}", self.host_report_prefix(), agent.as_str())
    }
    /// What every host report key starts with (the scripts append `<host>:<agent>`).
    pub(super) fn host_report_prefix(&self) -> String {
        format!("{}:host:", self.prefix)
    }
    /// Every host that reported (host id → last report, ms), so the engine can list them.
    pub fn hosts(&self) -> String {
        format!("{}:hosts", self.prefix)
    }
    /// Hosts being drained (`berth host drain`): host id → when the drain began (ms). No session
    /// is placed on them, and their sessions are sent `session.move`.
    pub fn draining(&self) -> String {
        format!("{}:draining", self.prefix)
    }
    /// One user's usage in one period (`2026-12-01`, `2026-12`): hash of [`crate::usage::Charge::fields`].
    pub fn usage(&self, user: &str, period: &str) -> String {
        format!("{}:usage:{user}:{period}", self.prefix)
    }
    /// When a thred was last metered (ms).
    pub fn metered(&self, thred_id: &str) -> String {
        format!("{}:metered:{thred_id}", self.prefix)
    }
    /// Set once a user was warned that a budget period is nearly spent.
    pub fn budget_warned(&self, user: &str, period: &str) -> String {
        format!("{}:budget-warned:{user}:{period}", self.prefix)
    }
    /// Threds of `pattern` waiting for capacity, by arrival (ms).
    pub fn queue(&self, pattern: &str) -> String {
        format!("{}:queue:{pattern}", self.prefix)
    }
    /// Which live thred of `pattern` owns `exclusive` (a string: the thred id).
    pub fn exclusive(&self, pattern: &str, exclusive: &str) -> String {
        format!("{}:exclusive:{pattern}:{exclusive}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Lua scripts build these keys from prefixes (`read_hosts`, the bind read's thred keys).
    #[test]
    fn the_scripts_prefixes_build_the_same_keys() {
        let keys = Keys::new("p");
        for agent in [AgentKind::Container, AgentKind::Workspace] {
            assert_eq!(format!("{}h1:{}", keys.host_report_prefix(), agent.as_str()), keys.host_report("h1", agent));
        }
        assert_eq!(keys.host_report("h1", AgentKind::Container), "p:host:h1:container");
        assert_eq!(keys.host_report("h1", AgentKind::Workspace), "p:host:h1:workspace");
        assert_eq!(format!("{}h1", keys.capacity_of(Some(""))), keys.capacity_of(Some("h1")));
        assert_eq!(format!("{}t1", keys.thred("")), keys.thred("t1"));
    }
}
