//! The engine: data-defined patterns, a pure state-machine core, threds and timers in Redis.

use std::future::Future;

use protocol::Profile;

/// Runs `berth engine` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let _ = (profile, shutdown);
    anyhow::bail!("`berth engine` is not built yet")
}

/// `berth bench engine`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench engine` is not built yet")
}

/// `berth patterns check`: validates files, prints every error, returns the exit code.
pub fn check_files_cli(files: &[std::path::PathBuf]) -> std::process::ExitCode {
    let _ = files;
    eprintln!("error: `berth patterns check` is not built yet");
    std::process::ExitCode::FAILURE
}
