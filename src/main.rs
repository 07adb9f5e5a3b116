//! `berth`: one binary for every Berth component and tool.

mod client;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use protocol::telemetry::{self, LogFormat};
use protocol::{AgentKind, Profile};

/// Every component allocates per message (events, JSON, CEL values): mimalloc's thread-local
/// heaps take that at a fraction of glibc malloc's cost under the runtime's threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "berth", version, about = "Isolated workspace containers on demand")]
struct Cli {
    /// Run-profile to use (a folder under BERTH_PROFILES_DIR, default ./run-profiles).
    #[arg(long, global = true, env = "BERTH_PROFILE", default_value = "dev")]
    profile: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine: consume events, step patterns, emit tasks, fire timers.
    Engine,
    /// Run one agent.
    Agent {
        #[arg(value_parser = parse_agent_kind)]
        kind: AgentKind,
    },
    /// Declare the topology, load patterns and seed users for a profile (idempotent).
    Bootstrap {
        /// Drop stored records first. Destroys data; never implied.
        #[arg(long)]
        reset: bool,
    },
    /// Engine and all agents in one process on embedded defaults.
    Dev,
    /// Publish one event to `berth.events` and wait for the broker's confirm.
    Publish(client::PublishArgs),
    /// Print events flowing on `berth.events`, one JSON per line.
    Tail(client::TailArgs),
    /// Operate on hosts (a host is one machine's container and workspace agents, `BERTH_HOST`).
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Work with pattern files.
    Patterns {
        #[command(subcommand)]
        command: PatternsCommand,
    },
    /// Mint a user token for development (printed alone on the last line).
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        role: Vec<String>,
        /// Lifetime, e.g. 30m, 1h, 2d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Measure a component against a baseline taken in the same run.
    Bench {
        what: Benchmark,
        /// `faults`: times the whole fault matrix runs.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// `faults`: concurrent sessions in each case.
        #[arg(long, default_value_t = 2)]
        sessions: usize,
        /// `open`: concurrent opens per round (1: one after another).
        #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 50])]
        levels: Vec<usize>,
        /// `open`: the large workspace reopened with one change, in MiB (5120 for 5 GB).
        #[arg(long, default_value_t = 1024)]
        large_mib: u64,
        /// `open`: wakes measured from each idle tier (paused, stopped with disk), and baseline rounds.
        #[arg(long, default_value_t = 20)]
        wake_rounds: usize,
        /// `open`: only the warm-pool rows, each next to a baseline of its own.
        #[arg(long)]
        warm_only: bool,
        /// `density`: the most sessions opened per idle tier.
        #[arg(long, default_value_t = 200)]
        max_sessions: usize,
    },
}

/// What `berth bench` measures.
#[derive(Clone, Copy, ValueEnum)]
enum Benchmark {
    /// The engine's event rate against the broker's raw consume+ack rate.
    Engine,
    /// Placement decision time, and the engine's open rate with three hosts reporting against none.
    Placement,
    /// Container provisioning against `docker run`.
    Provision,
    /// Materialize and sync against raw object-store transfers.
    Workspace,
    /// The persistence agent against direct store writes.
    Store,
    /// The session agent's WebSocket fan-out.
    Session,
    /// Open→ready end to end against `docker run`→health plus a raw download.
    E2e,
    /// Open→ready by kind of open (cold, cached reopen, warm-pool claim) and concurrency, and wakes from each idle tier, each against its baseline.
    Open,
    /// Sessions this host holds paused and stopped with disk, with memory per session.
    Density,
    /// The fault matrix (its own deployment of separate processes).
    Faults,
    /// The session agent's reverse proxy against direct requests.
    Proxy,
}

#[derive(Subcommand)]
enum HostCommand {
    /// No new session goes to this host, and its sessions move to other hosts (frozen,
    /// final-synced and removed there, reopened elsewhere from the object store).
    Drain { host: String },
    /// The host takes new sessions again.
    Undrain { host: String },
}

#[derive(Subcommand)]
enum PatternsCommand {
    /// Validate pattern files; exits non-zero naming file, state and field of each error.
    Check { files: Vec<PathBuf> },
}

fn parse_agent_kind(text: &str) -> Result<AgentKind, String> {
    text.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(LogFormat::from_env());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let load_profile = || Profile::load_named(&cli.profile);
    match cli.command {
        Command::Publish(args) => return client::publish(args, &cli.profile).await,
        Command::Tail(args) => client::tail(args, &cli.profile, shutdown_signal()).await?,
        Command::Patterns { command: PatternsCommand::Check { files } } => return Ok(engine::check_files_cli(&files)),
        Command::Host { command: HostCommand::Drain { host } } => {
            engine::hosts::drain(&load_profile()?, &host).await?;
            println!("host {host} drained: it takes no new session, and its sessions move to other hosts");
        }
        Command::Host { command: HostCommand::Undrain { host } } => {
            engine::hosts::undrain(&load_profile()?, &host).await?;
            println!("host {host} takes sessions again");
        }
        Command::Token { user, role, ttl } => {
            let profile = load_profile()?;
            let token = session::mint_token(&profile, &user, &role, &ttl)?;
            println!("{token}");
        }
        Command::Engine => engine::run(load_profile()?, shutdown_signal()).await?,
        Command::Agent { kind: AgentKind::Container } => container::run(load_profile()?, shutdown_signal()).await?,
        Command::Agent { kind: AgentKind::Workspace } => workspace::run(load_profile()?, shutdown_signal()).await?,
        Command::Agent { kind: AgentKind::Persistence } => persistence::run(load_profile()?, shutdown_signal()).await?,
        Command::Agent { kind: AgentKind::Session } => session::run(load_profile()?, shutdown_signal()).await?,
        Command::Bootstrap { reset } => {
            let reset = if reset { bootstrap::Reset::DropRecords } else { bootstrap::Reset::Keep };
            bootstrap::run(&load_profile()?, reset).await?;
        }
        Command::Dev => bootstrap::dev(load_profile()?, shutdown_signal()).await?,
        Command::Bench { what, rounds, sessions, levels, large_mib, wake_rounds, warm_only, max_sessions } => match what {
            Benchmark::Faults => {
                // Runs its own deployment of separate processes with its own profile (tests/profiles/faults).
                if !bench::faults::bench(rounds, sessions).await? {
                    return Ok(ExitCode::FAILURE);
                }
            }
            Benchmark::Engine => bench::engine(load_profile()?).await?,
            Benchmark::Placement => bench::placement(load_profile()?).await?,
            Benchmark::Provision => bench::provision(load_profile()?).await?,
            Benchmark::Workspace => bench::workspace(load_profile()?).await?,
            Benchmark::Store => bench::store(load_profile()?).await?,
            Benchmark::Session => bench::session(load_profile()?).await?,
            Benchmark::E2e => bench::e2e(load_profile()?).await?,
            Benchmark::Open => {
                let rows = if warm_only { bench::OpenRows::Warm } else { bench::OpenRows::All };
                bench::open(load_profile()?, bench::OpenBenchSettings { levels, large_mib, wake_rounds, rows }).await?
            }
            Benchmark::Density => bench::density(load_profile()?, bench::DensitySettings { max_sessions }).await?,
            Benchmark::Proxy => bench::proxy(load_profile()?).await?,
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown requested");
}
