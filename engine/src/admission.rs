//! Admission: the profile's `[limits]` for patterns with `start.admission` (live sessions and new
//! sessions per minute per user, and the memory and CPUs the host commits to live sessions).
//!
//! A starting event gets a verdict, decided here from counts read just before (`decide`, pure), and
//! handed to the pattern in `ctx.admission`. The read can be stale, so the commit script enforces the
//! same rules atomically (a user at the limit, or capacity that is gone, fails the commit and the
//! event is stepped again with the verdict the script implies). Threds that wait are queued first
//! come, first served; when capacity frees the engine sends the oldest one the pattern's admitted
//! event, and its commit takes the capacity, again atomically.

use serde_json::{json, Value};

use crate::core::Thred;
use crate::pattern::AdmissionSpec;
use crate::usage::Budget;
use protocol::host::cpu_millis_of;
use protocol::Profile;

/// What a thred of an admitted pattern holds, and what the host commits at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub need_memory_mib: u64,
    pub need_cpu_millis: u64,
    pub budget_memory_mib: u64,
    pub budget_cpu_millis: u64,
    pub max_sessions_per_user: u64,
    pub max_opens_per_minute: u64,
}

impl Capacity {
    /// From the profile; a budget of 0 is the host's size, detected now.
    pub fn of(profile: &Profile) -> Capacity {
        let limits = &profile.limits;
        let (budget_memory_mib, budget_cpu_millis) = protocol::host::budget(profile);
        Capacity {
            need_memory_mib: profile.container.memory_mib,
            need_cpu_millis: cpu_millis_of(profile.container.cpus),
            budget_memory_mib,
            budget_cpu_millis,
            max_sessions_per_user: u64::from(limits.max_sessions_per_user),
            max_opens_per_minute: u64::from(limits.max_opens_per_user_per_minute),
        }
    }

    /// The same needs and per-user limits against one host's budget.
    pub fn with_budget(self, budget_memory_mib: u64, budget_cpu_millis: u64) -> Capacity {
        Capacity { budget_memory_mib, budget_cpu_millis, ..self }
    }

    /// Whether one more thred fits next to what is committed.
    pub fn fits(&self, committed: Committed) -> bool {
        committed.memory_mib + self.need_memory_mib <= self.budget_memory_mib
            && committed.cpu_millis + self.need_cpu_millis <= self.budget_cpu_millis
    }
}

/// What live threds hold right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Committed {
    pub memory_mib: u64,
    pub cpu_millis: u64,
}

/// The counts a verdict is decided from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// New sessions this user opened in the current minute, this one included.
    pub opens_this_minute: u64,
    /// Live threds of this user (queued ones included).
    pub user_live: u64,
    /// Threds waiting in the queue.
    pub queued: u64,
    pub committed: Committed,
}

/// What becomes of a new thred.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Admit,
    /// Waits in the queue at this position (1 = next).
    Queue {
        position: u64,
    },
    /// Refused: `limit` names the limit, `max` its value.
    Refuse {
        limit: Limit,
        max: f64,
    },
}

/// The limits a refusal names (`detail.limit` of the user's notification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    SessionsPerUser,
    OpensPerMinute,
    /// A spent budget (`daily_budget`, `monthly_budget`).
    Budget(Budget),
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::SessionsPerUser => "sessions_per_user",
            Limit::OpensPerMinute => "opens_per_minute",
            Limit::Budget(budget) => budget.as_str(),
        }
    }
}

impl Verdict {
    /// `ctx.admission`, as the pattern reads it.
    pub fn to_value(&self) -> Value {
        match self {
            Verdict::Admit => json!({"verdict": "admit"}),
            Verdict::Queue { position } => json!({"verdict": "queue", "position": position}),
            Verdict::Refuse { limit, max } => json!({"verdict": "refuse", "limit": limit.as_str(), "max": max}),
        }
    }
}

/// The verdict for a new thred: refused over a per-user limit, queued behind anyone already waiting
/// or when the host's capacity would be exceeded, admitted otherwise.
pub fn decide(capacity: &Capacity, counts: Counts) -> Verdict {
    if counts.opens_this_minute > capacity.max_opens_per_minute {
        return Verdict::Refuse { limit: Limit::OpensPerMinute, max: capacity.max_opens_per_minute as f64 };
    }
    if counts.user_live >= capacity.max_sessions_per_user {
        return Verdict::Refuse { limit: Limit::SessionsPerUser, max: capacity.max_sessions_per_user as f64 };
    }
    if counts.queued > 0 || !capacity.fits(counts.committed) {
        return Verdict::Queue { position: counts.queued + 1 };
    }
    Verdict::Admit
}

/// Whether a thred holds capacity: live and not in a waiting state.
pub fn holds_capacity(spec: &AdmissionSpec, thred: &Thred) -> bool {
    !thred.ended && !spec.waiting_states.contains(&thred.state)
}

/// Whether a thred waits in the queue.
pub fn is_queued(spec: &AdmissionSpec, thred: &Thred) -> bool {
    !thred.ended && thred.state == spec.queue_state
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: Capacity = Capacity {
        need_memory_mib: 4096,
        need_cpu_millis: 2000,
        budget_memory_mib: 5 * 4096,
        budget_cpu_millis: 16_000,
        max_sessions_per_user: 2,
        max_opens_per_minute: 5,
    };

    #[track_caller]
    fn check(opens_this_minute: u64, user_live: u64, queued: u64, live_sessions: u64, expected: Verdict) {
        let committed = Committed { memory_mib: live_sessions * 4096, cpu_millis: live_sessions * 2000 };
        assert_eq!(decide(&CAPACITY, Counts { opens_this_minute, user_live, queued, committed }), expected);
    }

    #[test]
    fn verdicts() {
        check(1, 0, 0, 0, Verdict::Admit);
        check(1, 1, 0, 4, Verdict::Admit);
        // Seed 000's server: 5 users × 4 GiB on 20 GiB for sessions; the sixth waits.
        check(1, 0, 0, 5, Verdict::Queue { position: 1 });
        // Anyone already waiting goes first, even if this one would fit.
        check(1, 0, 2, 0, Verdict::Queue { position: 3 });
        check(1, 2, 0, 0, Verdict::Refuse { limit: Limit::SessionsPerUser, max: 2.0 });
        check(6, 0, 0, 0, Verdict::Refuse { limit: Limit::OpensPerMinute, max: 5.0 });
        check(5, 0, 0, 0, Verdict::Admit);
    }

    #[test]
    fn cpus_count_too() {
        let tight = Capacity { budget_cpu_millis: 3000, ..CAPACITY };
        let one_running = Committed { memory_mib: 4096, cpu_millis: 2000 };
        assert!(!tight.fits(one_running));
        assert!(tight.fits(Committed::default()));
        assert_eq!(cpu_millis_of(0.5), 500);
    }
}
