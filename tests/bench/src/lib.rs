//! `berth bench …`: every benchmark of Berth and the fixtures they need, outside the product
//! crates, which they drive through their public API only. Each bench prints its figures next to a
//! baseline measured in the same run; latencies go through the one [`stats`] module.
//!
//! Map, by `berth bench` target: `engine` [`engine_rate`], `placement` [`placement`], `provision`
//! [`provision`], `workspace` [`workspace_io`], `store` [`store`], `session` [`session_fanout`],
//! `e2e` [`e2e`] (with the session-event helpers the whole-deployment benches share), `open`
//! [`open`], `density` [`density`], `proxy` [`proxy`] (with its [`loadgen`]), `faults` [`faults`]
//! (on `bootstrap::faults`, the matrix `tests/faults.rs` shares). [`fixture`] seeds the object
//! store for them.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod density;
pub mod e2e;
pub mod engine_rate;
pub mod faults;
pub mod fixture;
pub mod loadgen;
pub mod open;
pub mod placement;
pub mod provision;
pub mod proxy;
pub mod session_fanout;
pub mod stats;
pub mod store;
pub mod workspace_io;

pub use density::{bench as density, DensitySettings};
pub use e2e::bench as e2e;
pub use engine_rate::bench as engine;
pub use open::{bench as open, OpenBenchSettings, OpenRows};
pub use placement::bench as placement;
pub use provision::bench as provision;
pub use proxy::bench as proxy;
pub use session_fanout::bench as session;
pub use store::bench as store;
pub use workspace_io::bench as workspace;
