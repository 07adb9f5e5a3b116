//! An engine in its own process, for the crash test: reads its `EngineConfig` as JSON from
//! `BERTH_ENGINE_CONFIG` and its profile from `BERTH_ENGINE_PROFILE`, runs until killed.

use std::path::PathBuf;

use engine::{pattern::load_pattern_file, service, EngineConfig};
use protocol::Profile;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    protocol::telemetry::init(protocol::telemetry::LogFormat::Pretty);
    let config: EngineConfig = serde_json::from_str(&std::env::var("BERTH_ENGINE_CONFIG")?)?;
    let profile = Profile::load(&PathBuf::from(std::env::var("BERTH_ENGINE_PROFILE")?))?;
    let patterns_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../patterns");
    let patterns =
        profile.patterns.iter().map(|name| load_pattern_file(&patterns_dir.join(format!("{name}.json")))).collect::<Result<Vec<_>, _>>()?;
    println!("engine-ready");
    service::run_engine(profile, patterns, config, std::future::pending()).await?;
    Ok(())
}
