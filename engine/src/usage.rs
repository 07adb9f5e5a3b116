//! Usage and budgets: what each user's sessions cost, per UTC day and month.
//!
//! The engine meters every live thred of an admitted pattern at a fixed interval: the time since it
//! was last metered is charged to its user at the rate of its current state (holding capacity, or
//! idle), together with the resources it holds (CPU-seconds and GiB-seconds). Totals live in Redis
//! (`usage:<user>:<period>` hashes, read by admission) and are written to the store's `usage`
//! collection (`<user>/<period>` documents, read by the HTTP API). The charge is attributed to the
//! state and the period of the meter tick, so a transition or midnight is off by at most one interval.

use chrono::{DateTime, Datelike, Utc};
use protocol::Profile;
use serde_json::{json, Value};

/// What an interval of one thred adds to its user's usage.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Charge {
    pub running_secs: f64,
    pub idle_secs: f64,
    pub cpu_secs: f64,
    pub gib_secs: f64,
    pub cost: f64,
}

impl Charge {
    pub fn plus(self, other: Charge) -> Charge {
        Charge {
            running_secs: self.running_secs + other.running_secs,
            idle_secs: self.idle_secs + other.idle_secs,
            cpu_secs: self.cpu_secs + other.cpu_secs,
            gib_secs: self.gib_secs + other.gib_secs,
            cost: self.cost + other.cost,
        }
    }

    /// The fields, as stored (Redis hash fields and store document fields alike).
    pub fn fields(&self) -> [(&'static str, f64); 5] {
        [
            ("running_secs", self.running_secs),
            ("idle_secs", self.idle_secs),
            ("cpu_secs", self.cpu_secs),
            ("gib_secs", self.gib_secs),
            ("cost", self.cost),
        ]
    }
}

/// Whether a metered thred held capacity or idled during the interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    Holding,
    Idle,
}

/// The prices and the resources one session holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub running_per_hour: f64,
    pub idle_per_hour: f64,
    pub cpus: f64,
    pub memory_gib: f64,
    pub daily_budget: f64,
    pub monthly_budget: f64,
}

impl Rates {
    pub fn of(profile: &Profile) -> Rates {
        let limits = &profile.limits;
        Rates {
            running_per_hour: limits.price_per_running_hour,
            idle_per_hour: limits.price_per_idle_hour,
            cpus: profile.container.cpus,
            memory_gib: profile.container.memory_mib as f64 / 1024.0,
            daily_budget: limits.daily_budget,
            monthly_budget: limits.monthly_budget,
        }
    }

    /// The charge of `seconds` in `metered`. Paused containers hold their memory (GiB-seconds
    /// accrue) but use no CPU.
    pub fn charge(&self, metered: Metered, seconds: f64) -> Charge {
        let hours = seconds / 3600.0;
        match metered {
            Metered::Holding => Charge {
                running_secs: seconds,
                idle_secs: 0.0,
                cpu_secs: seconds * self.cpus,
                gib_secs: seconds * self.memory_gib,
                cost: hours * self.running_per_hour,
            },
            Metered::Idle => Charge {
                running_secs: 0.0,
                idle_secs: seconds,
                cpu_secs: 0.0,
                gib_secs: seconds * self.memory_gib,
                cost: hours * self.idle_per_hour,
            },
        }
    }

    /// The first budget `spent` has used up, if any.
    pub fn exhausted(&self, spent: Spent) -> Option<Budget> {
        Budget::ALL.into_iter().find(|budget| {
            let (limit, used) = self.of_budget(*budget, spent);
            limit > 0.0 && used >= limit
        })
    }

    /// The first budget `spent` has used 80 % of, if any (for the warning).
    pub fn nearly_exhausted(&self, spent: Spent) -> Option<Budget> {
        Budget::ALL.into_iter().find(|budget| {
            let (limit, used) = self.of_budget(*budget, spent);
            limit > 0.0 && used >= 0.8 * limit
        })
    }

    /// A budget's limit and what was used of it.
    pub fn of_budget(&self, budget: Budget, spent: Spent) -> (f64, f64) {
        match budget {
            Budget::Daily => (self.daily_budget, spent.day),
            Budget::Monthly => (self.monthly_budget, spent.month),
        }
    }

    pub fn has_budgets(&self) -> bool {
        self.daily_budget > 0.0 || self.monthly_budget > 0.0
    }
}

/// What a user spent today and this month.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Spent {
    pub day: f64,
    pub month: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Daily,
    Monthly,
}

impl Budget {
    pub const ALL: [Budget; 2] = [Budget::Daily, Budget::Monthly];

    /// The limit's name, as a refusal or a warning names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Budget::Daily => "daily_budget",
            Budget::Monthly => "monthly_budget",
        }
    }

    /// The period a budget covers at `now`: `2026-12-01` or `2026-12`.
    pub fn period(self, now: DateTime<Utc>) -> String {
        match self {
            Budget::Daily => now.format("%Y-%m-%d").to_string(),
            Budget::Monthly => format!("{:04}-{:02}", now.year(), now.month()),
        }
    }
}

/// The store document of one user's usage in one period, from the totals.
pub fn usage_document(user: &str, profile: &str, period: &str, totals: &[(String, f64)]) -> Value {
    let mut document = json!({"user": user, "profile": profile, "period": period});
    for (field, value) in totals {
        document[field.as_str()] = json!(value);
    }
    document
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATES: Rates =
        Rates { running_per_hour: 0.10, idle_per_hour: 0.01, cpus: 2.0, memory_gib: 4.0, daily_budget: 5.0, monthly_budget: 50.0 };

    #[test]
    fn charges_follow_the_state() {
        let hour = RATES.charge(Metered::Holding, 3600.0);
        assert_eq!(hour, Charge { running_secs: 3600.0, idle_secs: 0.0, cpu_secs: 7200.0, gib_secs: 14400.0, cost: 0.10 });
        let idle = RATES.charge(Metered::Idle, 1800.0);
        assert_eq!((idle.cpu_secs, idle.gib_secs, idle.cost), (0.0, 7200.0, 0.005));
    }

    #[test]
    fn budgets_warn_at_four_fifths_and_stop_when_spent() {
        assert_eq!(RATES.nearly_exhausted(Spent { day: 3.9, month: 3.9 }), None);
        assert_eq!(RATES.nearly_exhausted(Spent { day: 4.0, month: 4.0 }), Some(Budget::Daily));
        assert_eq!(RATES.exhausted(Spent { day: 4.99, month: 10.0 }), None);
        assert_eq!(RATES.exhausted(Spent { day: 5.0, month: 10.0 }), Some(Budget::Daily));
        assert_eq!(RATES.exhausted(Spent { day: 1.0, month: 50.0 }), Some(Budget::Monthly));
        let free = Rates { daily_budget: 0.0, monthly_budget: 0.0, ..RATES };
        assert_eq!(free.exhausted(Spent { day: 1e9, month: 1e9 }), None);
        assert!(!free.has_budgets());
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T23:59:59Z").map(|time| time.with_timezone(&Utc)).ok();
        let now = now.unwrap_or_default();
        assert_eq!(Budget::Daily.period(now), "2026-12-01");
        assert_eq!(Budget::Monthly.period(now), "2026-12");
    }
}
