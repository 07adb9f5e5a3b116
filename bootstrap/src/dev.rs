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
    // One process, one metrics address: the engine serves it; the agents' bus counters are
    // served when they run as processes of their own.
    let mut agents_profile = profile.clone();
    agents_profile.services.metrics_addr = None;
    let profile = &agents_profile;
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
    // Printed once the console answers, so the first link clicked works.
    tokio::spawn({
        let profile = profile.clone();
        async move {
            let address = browser_address(&profile.services.session_addr);
            for _ in 0..300 {
                if tokio::net::TcpStream::connect(&address).await.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            print_welcome(&profile);
        }
    });

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

/// How long the one-click sign-in links `berth dev` prints stay valid (each works once).
const SIGN_IN_LINK_TTL: &str = "15m";

fn print_welcome(profile: &Profile) {
    let address = browser_address(&profile.services.session_addr);
    let link = |user: &str, roles: &[String]| match session::mint_token(profile, user, roles, SIGN_IN_LINK_TTL) {
        Ok(token) => format!("http://{address}/console/signin?link={token}"),
        Err(error) => format!("(no link: {error:#}; sign in at http://{address}/ with a token)"),
    };
    let berth = berth_command(profile);
    println!();
    println!("berth dev is running (profile {})", profile.name);
    println!();
    println!("  Open the console, signed in as alice (one click; the link works once, for {SIGN_IN_LINK_TTL}):");
    println!("    {}", link("alice", &[]));
    println!("  ... or as an admin (every session, capacity, the queue):");
    println!("    {}", link("admin", &["admin".to_owned()]));
    println!();
    println!("  console:       http://{address}/   (sign in with a token)");
    println!("  a token:       {berth} token --user alice");
    println!("  a new link:    {berth} token --user alice --ttl 15m   then open http://{address}/console/signin?link=<token>");
    println!("  watch events:  {berth} tail");
    println!("  HTTP API:      http://{address}/api/openapi.json");
    println!("  WebSocket:     ws://{address}/ws   (agents/session/README.md)");
    if std::env::var_os(&profile.session.jwt_key_env).is_some() {
        println!("  (tokens need the same {} in the shell you run them from)", profile.session.jwt_key_env);
    }
    println!();
}

/// The address a browser on this machine uses for `session_addr` (a wildcard listens everywhere,
/// the loopback answers).
fn browser_address(session_addr: &str) -> String {
    match session_addr.rsplit_once(':') {
        Some(("0.0.0.0" | "[::]" | "::", port)) => format!("127.0.0.1:{port}"),
        _ => session_addr.to_owned(),
    }
}

/// `berth --profile <name>` as a newcomer can paste it: this very binary by its full path, the
/// profile folder it was loaded from, and the `BERTH_*` settings this `berth dev` runs with (they
/// decide the broker, the store and where the token key file is), secrets left out.
fn berth_command(profile: &Profile) -> String {
    let executable = std::env::current_exe().map_or_else(|_| "berth".to_owned(), |path| path.display().to_string());
    let profiles_dir =
        profile.path.parent().and_then(std::path::Path::parent).map(|dir| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
    let here = std::env::current_dir().ok();
    let default_dir = here.as_ref().and_then(|dir| std::fs::canonicalize(dir.join("run-profiles")).ok());
    let mut settings: Vec<String> = std::env::vars()
        .filter(|(name, _)| name.starts_with("BERTH_") && name != "BERTH_PROFILES_DIR" && !is_secret(name, profile))
        .map(|(name, value)| format!("{name}={}", shell_quoted(&value)))
        .collect();
    settings.sort();
    let mut prefix = String::new();
    match (&profiles_dir, &default_dir, &here) {
        (Some(used), Some(default), Some(here)) if used == default => {
            prefix.push_str(&format!("cd {} && ", shell_quoted(&here.display().to_string())))
        }
        (Some(used), _, _) => settings.insert(0, format!("BERTH_PROFILES_DIR={}", shell_quoted(&used.display().to_string()))),
        _ => {}
    }
    for setting in settings {
        prefix.push_str(&setting);
        prefix.push(' ');
    }
    format!("{prefix}{executable} --profile {}", profile.name)
}

fn is_secret(name: &str, profile: &Profile) -> bool {
    name == profile.session.jwt_key_env || ["SECRET", "PASSWORD", "KEY", "TOKEN"].iter().any(|word| name.contains(word))
}

/// `value` as one shell word.
fn shell_quoted(value: &str) -> String {
    let plain = !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || "/._-:@%+=,".contains(c));
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}
