//! Logging setup shared by every subcommand.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::{fmt, EnvFilter};

/// `LOG_FORMAT`: human-readable on a terminal, JSON lines for log collectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` filters (default `info`).
///
/// Without an explicit format, JSON is chosen when stdout is not a terminal:
/// Railway and other platforms collect stdout and parse JSON lines.
pub fn init(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stdout().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let builder = fmt().with_env_filter(filter);
    // try_init: tests and embedding callers may have installed one already.
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
