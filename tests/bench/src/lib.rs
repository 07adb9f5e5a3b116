//! `berth bench …`: every benchmark of Berth and the fixtures they need, outside the product
//! crates, which they drive through their public API only. Each bench prints its figures next to a
//! baseline measured in the same run; latencies go through the one [`stats`] module.
//!
//! Map: [`e2e`] (whole sessions, and the session-event helpers the other whole-deployment benches
//! share), [`open`], [`density`], [`proxy`] (with its [`loadgen`]), [`store`] (the persistence
//! agent), [`workspace_io`] (materialize and sync); [`fixture`] seeds the object store for them.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod density;
pub mod e2e;
pub mod fixture;
pub mod loadgen;
pub mod open;
pub mod proxy;
pub mod stats;
pub mod store;
pub mod workspace_io;

pub use density::{bench as density, DensitySettings};
pub use e2e::bench as e2e;
pub use open::{bench as open, OpenBenchSettings, OpenRows};
pub use proxy::bench as proxy;
pub use store::bench as store;
pub use workspace_io::bench as workspace;
