//! Runs `berth bench engine` without building the whole `berth` binary:
//! `cargo run -p engine --release --example bench_engine`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    protocol::telemetry::init(protocol::telemetry::LogFormat::Pretty);
    let profile = protocol::Profile::load_named("dev")?;
    engine::bench(profile).await
}
