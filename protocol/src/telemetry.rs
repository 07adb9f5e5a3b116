//! Logging set-up, once per binary: `RUST_LOG` filters, `BERTH_LOG_FORMAT=json` for JSON lines.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl LogFormat {
    /// `BERTH_LOG_FORMAT=json` selects JSON; anything else is human-readable.
    pub fn from_env() -> LogFormat {
        match std::env::var("BERTH_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Pretty,
        }
    }
}

/// Installs the global subscriber. Logs go to stderr so that stdout stays for command output.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn"));
    // lapin logs every returned (unroutable mandatory) message with its whole body; the bus
    // reports it as `BusError::Unroutable`, naming exchange and routing key, without the body.
    let filter = match "lapin::returned_messages=off".parse() {
        Ok(quiet_returns) => filter.add_directive(quiet_returns),
        Err(_) => filter,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    // A second init (tests, `berth dev`) keeps the first subscriber.
    drop(installed);
}
