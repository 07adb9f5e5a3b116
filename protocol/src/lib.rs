//! Berth's wire contracts and the plumbing every component shares: CloudEvents, tasks and
//! notifications, the broker topology, the AMQP bus, run-profiles and logging set-up.
//!
//! Only this crate knows the wire format; components convert at this edge.

pub mod backoff;
pub mod broker_admin;
pub mod bus;
pub mod event;
pub mod events;
pub mod host;
pub mod identity;
pub mod ids;
pub mod message;
pub mod metrics;
pub mod profile;
pub mod store;
pub mod supervise;
pub mod tasks;
pub mod telemetry;
pub mod topology;

pub use bus::{Bus, BusConfig, ConsumeSpec, Incoming, Outcome, Properties};
pub use event::{CloudEvent, EnvelopeError};
pub use identity::{Identity, Sender};
pub use message::{AgentKind, Notification, Task};
pub use profile::Profile;
