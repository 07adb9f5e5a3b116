//! `berth publish` and `berth tail`: the command-line client of the bus.

use std::future::Future;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use protocol::event::DEFAULT_MAX_EVENT_BYTES;
use protocol::{events, topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Identity, Outcome, Profile};

/// Exit code for input that was refused before anything was published.
const EXIT_BAD_INPUT: u8 = 2;

#[derive(clap::Args)]
pub struct PublishArgs {
    /// Event type, e.g. `session.open`.
    #[arg(long = "type", conflicts_with = "file")]
    event_type: Option<String>,
    /// Subject (the session id).
    #[arg(long, conflicts_with = "file")]
    subject: Option<String>,
    /// Event data as JSON.
    #[arg(long, conflicts_with = "file")]
    data: Option<String>,
    /// Extension attribute `name=value` (repeatable), e.g. `userid=alice`.
    #[arg(long = "ext", conflicts_with = "file")]
    extensions: Vec<String>,
    /// Source attribute.
    #[arg(long, default_value = "/berth/cli")]
    source: String,
    /// A file holding one complete CloudEvent in JSON (`-` for stdin).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Broker URL (default: the profile's).
    #[arg(long, env = "BERTH_AMQP_URL")]
    amqp_url: Option<String>,
    /// The bus identity to publish as: `client` (its own RabbitMQ user, which may publish only
    /// the session events of `protocol::identity::CLIENT_SESSION_EVENTS`) or `admin` (the user of the broker URL).
    #[arg(long = "as", default_value = "client", value_parser = ["client", "admin"])]
    identity: String,
}

#[derive(clap::Args)]
pub struct TailArgs {
    /// Topic pattern on event types, e.g. `session.*` or `container.#`.
    #[arg(long = "type", default_value = "#")]
    type_pattern: String,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Broker URL (default: the profile's).
    #[arg(long, env = "BERTH_AMQP_URL")]
    amqp_url: Option<String>,
}

fn amqp_url(explicit: Option<String>, profile: &str) -> anyhow::Result<String> {
    match explicit {
        Some(url) => Ok(url),
        None => Ok(Profile::load_named(profile)?.services.amqp_url),
    }
}

/// Builds the event from the arguments, or says why it can't.
fn event_from_args(args: &PublishArgs) -> Result<CloudEvent, String> {
    if let Some(path) = &args.file {
        let mut bytes = Vec::new();
        let read = if path.as_os_str() == "-" {
            std::io::stdin().read_to_end(&mut bytes).map(|_| ())
        } else {
            std::fs::read(path).map(|content| bytes = content)
        };
        read.map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let event = CloudEvent::parse(&bytes, DEFAULT_MAX_EVENT_BYTES).map_err(|error| error.to_string())?;
        return events::check(&event).map(|()| event).map_err(|error| error.to_string());
    }
    let Some(event_type) = &args.event_type else {
        return Err("give --type (with --subject, --data) or --file".to_owned());
    };
    let data = match &args.data {
        None => serde_json::Value::Null,
        Some(text) => serde_json::from_str(text).map_err(|error| format!("--data is not valid JSON: {error}"))?,
    };
    let mut event = CloudEvent::new(event_type, &args.source, args.subject.as_deref(), data);
    for extension in &args.extensions {
        let (name, value) = extension.split_once('=').ok_or_else(|| format!("--ext {extension:?} must be name=value"))?;
        event.extensions.insert(name.to_owned(), serde_json::Value::String(value.to_owned()));
    }
    // Run the same validation a consumer would, so that nothing invalid is ever published: the
    // envelope's, then the catalogue type's for the data of a catalogue event.
    let event = CloudEvent::parse(&event.to_bytes(), DEFAULT_MAX_EVENT_BYTES).map_err(|error| error.to_string())?;
    events::check(&event).map(|()| event).map_err(|error| error.to_string())
}

pub async fn publish(args: PublishArgs, profile: &str) -> anyhow::Result<ExitCode> {
    let event = match event_from_args(&args) {
        Ok(event) => event,
        Err(reason) => {
            eprintln!("error: invalid event: {reason}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let identity = if args.identity == "admin" { Identity::Admin } else { Identity::Client };
    let bus = Bus::connect(BusConfig::for_identity(&amqp_url(args.amqp_url, profile)?, identity, "berth-publish")?).await?;
    bus.declare_topology().await?;
    bus.publish_event(&event).await?;
    bus.close().await;
    println!("{}", event.id);
    Ok(ExitCode::SUCCESS)
}

pub async fn tail(args: TailArgs, profile: &str, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let bus = Bus::connect(BusConfig::new(&amqp_url(args.amqp_url, profile)?, "berth-tail")).await?;
    bus.declare_topology().await?;
    let queue = bus.declare_private_queue(topology::EVENTS_EXCHANGE, std::slice::from_ref(&args.type_pattern)).await?;
    let (done_sender, mut done) = tokio::sync::mpsc::channel::<()>(1);
    let remaining = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(args.count.unwrap_or(u64::MAX)));
    let printer = move |incoming: protocol::Incoming| {
        let remaining = remaining.clone();
        let done_sender = done_sender.clone();
        async move {
            let line = match serde_json::from_slice::<serde_json::Value>(&incoming.body) {
                Ok(json) => json.to_string(),
                Err(_) => String::from_utf8_lossy(&incoming.body).into_owned(),
            };
            println!("{line}");
            if remaining.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                let _ = done_sender.try_send(());
            }
            Outcome::Ack
        }
    };
    let stop = async {
        tokio::select! {
            () = shutdown => {}
            _ = done.recv() => {}
        }
    };
    let mut spec = ConsumeSpec::new(&queue, 50);
    spec.concurrency = 1;
    bus.consume(spec, printer, stop).await?;
    let _ = bus.delete_queue(&queue).await;
    bus.close().await;
    Ok(())
}
