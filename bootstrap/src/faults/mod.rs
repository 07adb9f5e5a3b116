//! The fault matrix, shared by `tests/faults.rs` and `berth bench faults` (`bench::faults`): a
//! deployment run as separate `berth` processes on services of its own ([`harness`]), and the
//! cases that break it and count what reached the object store ([`cases`]).
//!
//! Counts: *lost* = a file whose bytes are not in the store after its session ended; *overwritten*
//! = a version someone else wrote that was replaced without a conflict copy; *stranded* = a
//! container or directory left behind. The freeze cost is `stopping` → `saving` in each session's
//! audit trail: what freezing the container adds to a close.

pub mod cases;
pub mod harness;

pub use cases::{run_case, Case, Tally, WorkspacePhase};
pub use harness::{Component, Deployment, HarnessConfig};
