//! `berth dev`: bootstrap, then the engine and all four agents in one process, each as its own task
//! running the same `run` function as the separate service. One failing component stops them all.

use std::future::Future;

use protocol::Profile;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::{bootstrap, Reset};

/// A shutdown future for one component, completing when the shared flag turns true.
fn stop_signal(receiver: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut receiver = receiver.clone();
    async move {
        let _ = receiver.wait_for(|stopping| *stopping).await;
    }
}

/// The components `berth dev` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Components {
    /// Engine and all four agents.
    All,
    /// Everything but the session agent (benchmarks that watch notifications themselves).
    Headless,
}

/// Spawns the engine and the agents, each on its own task; they stop when `stopping` turns true.
pub fn spawn_components(
    profile: &Profile,
    which: Components,
    stopping: &watch::Receiver<bool>,
) -> JoinSet<(&'static str, anyhow::Result<()>)> {
    let mut components = JoinSet::new();
    components.spawn({
        let (profile, stopped) = (profile.clone(), stop_signal(stopping));
        async move { ("engine", engine::run(profile, stopped).await) }
    });
    components.spawn({
        let (profile, stopped) = (profile.clone(), stop_signal(stopping));
        async move { ("container agent", container::run(profile, stopped).await) }
    });
    components.spawn({
        let (profile, stopped) = (profile.clone(), stop_signal(stopping));
        async move { ("workspace agent", workspace::run(profile, stopped).await) }
    });
    components.spawn({
        let (profile, stopped) = (profile.clone(), stop_signal(stopping));
        async move { ("persistence agent", persistence::run(profile, stopped).await) }
    });
    if which == Components::All {
        components.spawn({
            let (profile, stopped) = (profile.clone(), stop_signal(stopping));
            async move { ("session agent", session::run(profile, stopped).await) }
        });
    }
    components
}

/// Runs every component until `shutdown` completes or one of them fails.
pub async fn dev(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let report = bootstrap(&profile, Reset::Keep).await?;
    tracing::info!(%report, "bootstrapped");
    let (stop, stopping) = watch::channel(false);
    let mut components = spawn_components(&profile, Components::All, &stopping);
    print_welcome(&profile);

    let mut shutdown = std::pin::pin!(shutdown);
    let mut first_failure = None;
    loop {
        tokio::select! {
            () = shutdown.as_mut(), if !*stop.borrow() => {
                let _ = stop.send(true);
            }
            finished = components.join_next() => {
                let Some(finished) = finished else { break };
                let (name, outcome) = finished.unwrap_or(("a component", Err(anyhow::anyhow!("panicked"))));
                match outcome {
                    Ok(()) => tracing::info!(component = name, "stopped"),
                    Err(error) => {
                        tracing::error!(component = name, error = %format!("{error:#}"), "component failed; stopping the others");
                        first_failure.get_or_insert(error.context(format!("{name} failed")));
                    }
                }
                let _ = stop.send(true);
            }
        }
    }
    match first_failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn print_welcome(profile: &Profile) {
    let address = &profile.services.session_addr;
    println!("berth dev is running (profile {})", profile.name);
    println!("  WebSocket:  ws://{address}/ws");
    println!("  health:     http://{address}/healthz");
    println!("  a token:    berth --profile {} token --user alice", profile.name);
    println!("  watch:      berth tail");
}
