//! `observer`: one binary, five subcommands (docs/product.md). Thin by design: it
//! parses configuration (the one place per process that reads the environment),
//! sets up logging and signals, and hands over to the library crates.

mod cli;
mod demo;
mod telemetry;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // A missing .env is normal (production injects the environment).
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line.
            tracing::error!(error = format!("{err:#}"), "observer failed");
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate(args) => {
            let db = args.db.connect(2).await?;
            observer_db::migrate::run(db.pool())
                .await
                .context("applying migrations and policies")?;
            tracing::info!("database is up to date");
            Ok(())
        }
        Command::Worker(args) => cli::run_worker(args, shutdown_signal()).await,
        Command::Api(args) => cli::run_api(args, shutdown_signal()).await,
        Command::Sim(args) => cli::run_sim(args, shutdown_signal()).await,
        Command::Demo(args) => demo::run(args, shutdown_signal()).await,
    }
}

/// Resolves on SIGTERM (what Railway and `docker stop` send) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
