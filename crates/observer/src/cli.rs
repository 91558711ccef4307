//! Command-line and environment configuration: every setting is a flag and an
//! environment variable (`#[arg(long, env)]`), documented in `.env.example`.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret as _, SecretString};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "observer",
    version,
    about = "Support Observer: a live, read-only, permission-aware view of Discord support servers"
)]
pub struct Cli {
    /// Log format: `pretty` (default on a terminal) or `json` (default otherwise). `RUST_LOG` filters.
    #[arg(long, env = "LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations and row-level-security policies (idempotent; safe to run concurrently).
    Migrate(MigrateArgs),
    /// Ingest guilds from the Discord Gateway into PostgreSQL.
    Worker(WorkerArgs),
    /// Serve GraphQL, OAuth login, the dashboard and metrics.
    Api(ApiArgs),
    /// Run the built-in Discord simulator alone (gateway, REST, OAuth, control API).
    Sim(SimArgs),
    /// Run everything locally with no accounts: PostgreSQL (private if DATABASE_URL is unset),
    /// the simulator with synthetic support traffic, the worker and the API.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// PostgreSQL connection string (may hold a password: never shown in `--help` or `Debug`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = secret)]
    pub database_url: SecretString,
}

impl DbArgs {
    pub async fn connect(&self, max_connections: u32) -> anyhow::Result<observer_db::Db> {
        observer_db::Db::connect(self.database_url.expose_secret(), max_connections)
            .await
            .context("connecting to DATABASE_URL")
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Args)]
pub struct DiscordArgs {
    /// Discord-compatible server: REST at `{base}/api/v10`, OAuth token at `{base}/api/oauth2/token`,
    /// authorize at `{base}/oauth2/authorize`; the gateway URL comes from `GET {base}/api/v10/gateway`.
    #[arg(
        long,
        env = "DISCORD_API_BASE_URL",
        default_value = "https://discord.com"
    )]
    pub discord_api_base_url: String,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub discord: DiscordArgs,
    /// Bot token (without the `Bot ` prefix).
    #[arg(long, env = "DISCORD_TOKEN", hide_env_values = true, value_parser = secret)]
    pub discord_token: SecretString,
    /// Shard ids this process runs, e.g. `0-3` or `5` (needs --shard-count). Default: shard 0 of 1.
    #[arg(long, env = "WORKER_SHARDS", requires = "shard_count")]
    pub shards: Option<String>,
    /// Total number of shards across all worker processes.
    #[arg(long, env = "WORKER_SHARD_COUNT")]
    pub shard_count: Option<u32>,
    /// After a gap (start, a re-identify, an outage), re-read each channel's
    /// messages of the last this many hours to catch edits and deletions made
    /// meanwhile (with WORKER_RECONCILE_MESSAGES, whichever reaches further back).
    /// Both 0 disable it.
    #[arg(long, env = "WORKER_RECONCILE_HOURS", default_value_t = 24)]
    pub reconcile_hours: u64,
    /// ... and at least this many of each channel's newest messages.
    #[arg(long, env = "WORKER_RECONCILE_MESSAGES", default_value_t = 500)]
    pub reconcile_messages: usize,
    /// Seconds between retention purges (messages older than their guild's retention); 0 disables.
    #[arg(long, env = "WORKER_PURGE_INTERVAL_SECS", default_value_t = 600)]
    pub purge_interval_secs: u64,
    /// Where the worker serves Prometheus `/metrics` (empty to disable).
    #[arg(long, env = "WORKER_METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: String,
    /// Discord REST requests per second this process allows itself across all
    /// routes. Discord's global limit (50/s) is per bot token: with N worker
    /// processes on one token, give each 50/N. 0 turns pacing off.
    #[arg(long, env = "WORKER_DISCORD_REQUESTS_PER_SEC", default_value_t = 50)]
    pub discord_requests_per_sec: u32,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub discord: DiscordArgs,
    /// OAuth application id.
    #[arg(long, env = "DISCORD_CLIENT_ID")]
    pub discord_client_id: String,
    /// OAuth application secret.
    #[arg(long, env = "DISCORD_CLIENT_SECRET", hide_env_values = true, value_parser = secret)]
    pub discord_client_secret: SecretString,
    /// Where browsers reach the API; the OAuth redirect is `{PUBLIC_URL}/auth/callback`; cookies are
    /// `Secure` when it is https.
    #[arg(long, env = "PUBLIC_URL", default_value = "http://localhost:3000")]
    pub public_url: String,
    /// Listen port (Railway sets it).
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Listen address.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Per-viewer rate limit: sustained GraphQL requests per second…
    #[arg(long, env = "API_RATE_PER_SEC", default_value_t = 20.0)]
    pub rate_per_sec: f64,
    /// …and burst size.
    #[arg(long, env = "API_RATE_BURST", default_value_t = 60)]
    pub rate_burst: u32,
    /// Database connections the api keeps (one more is used by the LISTEN connection).
    #[arg(long, env = "API_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,
    /// Seconds between keepalive pings on quiet GraphQL WebSockets (a
    /// WebSocket ping, plus `ka` on the legacy protocol).
    #[arg(long, env = "API_WS_KEEPALIVE_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_keepalive_secs: u64,
    /// Seconds a new GraphQL WebSocket may take to send `connection_init`
    /// (then it is closed with 4408).
    #[arg(long, env = "API_WS_INIT_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_init_timeout_secs: u64,
    /// Reverse proxies in front of the api that append to X-Forwarded-For
    /// (Railway: 1). 0 ignores the header: the peer address is the client.
    #[arg(long, env = "API_TRUSTED_PROXY_HOPS", default_value_t = 0)]
    pub trusted_proxy_hops: usize,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Port for the simulator (HTTP, OAuth, gateway WebSocket and `/_sim/` control API).
    #[arg(long, env = "SIM_PORT", default_value_t = 4000)]
    pub port: u16,
    /// Bot token the simulator accepts.
    #[arg(long, env = "SIM_BOT_TOKEN", default_value = "sim-bot-token")]
    pub bot_token: String,
    /// OAuth client id the simulator accepts (a snowflake: it is also the READY application id).
    #[arg(long, env = "SIM_CLIENT_ID", default_value = "1000000000000000001")]
    pub client_id: String,
    /// OAuth client secret the simulator accepts.
    #[arg(
        long,
        env = "SIM_CLIENT_SECRET",
        default_value = "sim-client-secret",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// Seed for the generated scenario and traffic.
    #[arg(long, env = "SIM_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Synthetic support messages per second (0 = none).
    #[arg(long, env = "SIM_TRAFFIC_RATE", default_value_t = 0.0)]
    pub traffic_rate: f64,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Use this PostgreSQL instead of starting a private one.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = secret)]
    pub database_url: Option<SecretString>,
    /// API / dashboard port.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Simulator port.
    #[arg(long, env = "SIM_PORT", default_value_t = 4000)]
    pub sim_port: u16,
    /// Folder for the private PostgreSQL cluster.
    #[arg(long, env = "DEMO_DATA_DIR", default_value = ".demo-data")]
    pub data_dir: std::path::PathBuf,
    /// Synthetic support messages per second.
    #[arg(long, env = "SIM_TRAFFIC_RATE", default_value_t = 2.0)]
    pub traffic_rate: f64,
    /// Seed for the generated scenario and traffic.
    #[arg(long, env = "SIM_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Days of back-dated support history in every guild's forums before the
    /// worker connects, so the queue has numbers from the start (0 = none).
    #[arg(long, env = "SIM_SUPPORT_HISTORY_DAYS", default_value_t = 7, value_parser = clap::value_parser!(u32).range(0..=90))]
    pub support_history_days: u32,
}

/// Parses a flag or environment value into a secret, so it stays out of
/// `Debug` output from the start.
fn secret(s: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s))
}

pub fn parse_addr(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .with_context(|| format!("invalid listen address {s:?}"))
}

impl WorkerArgs {
    pub fn worker_config(&self) -> anyhow::Result<observer_worker::Config> {
        let mut config = observer_worker::Config::new(self.discord_token.clone());
        config.api_base_url = self.discord.discord_api_base_url.clone();
        config.metrics_addr = parse_addr(&self.metrics_addr)?;
        config.rest.limits.global_per_sec = self.discord_requests_per_sec;
        config.purge_interval = (self.purge_interval_secs > 0)
            .then(|| std::time::Duration::from_secs(self.purge_interval_secs));
        config.reconcile = (self.reconcile_hours > 0 || self.reconcile_messages > 0).then(|| {
            observer_worker::reconcile::Window {
                max_age: std::time::Duration::from_secs(self.reconcile_hours.saturating_mul(3600)),
                min_messages: self.reconcile_messages,
            }
        });
        config.shards = match (&self.shards, self.shard_count) {
            (Some(range), Some(count)) => Some(
                observer_worker::ShardRange::parse(range, count)
                    .map_err(|e| anyhow::anyhow!("--shards/--shard-count: {e}"))?,
            ),
            (None, Some(count)) => Some(
                observer_worker::ShardRange::parse(
                    &format!("0-{}", count.saturating_sub(1)),
                    count,
                )
                .map_err(|e| anyhow::anyhow!("--shard-count: {e}"))?,
            ),
            (_, None) => None,
        };
        Ok(config)
    }
}

pub async fn run_worker(
    args: WorkerArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let config = args.worker_config()?;
    let db = args.db.connect(8).await?;
    observer_worker::run(config, db, shutdown).await
}

impl ApiArgs {
    pub fn api_config(&self) -> observer_api::Config {
        let defaults = observer_api::Config::default();
        observer_api::Config {
            public_url: self.public_url.clone(),
            discord_client_id: self.discord_client_id.clone(),
            discord_client_secret: self.discord_client_secret.clone(),
            discord_api_base_url: self.discord.discord_api_base_url.clone(),
            limits: observer_api::Limits {
                rate_burst: self.rate_burst,
                rate_per_sec: self.rate_per_sec,
                ws_keepalive: std::time::Duration::from_secs(self.ws_keepalive_secs),
                ws_init_timeout: std::time::Duration::from_secs(self.ws_init_timeout_secs),
                ..defaults.limits.clone()
            },
            trusted_proxy_hops: self.trusted_proxy_hops,
            ..defaults
        }
    }
}

pub async fn run_api(
    args: ApiArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let db = args.db.connect(args.db_pool_size).await?;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, public_url = %args.public_url, "api listening");
    observer_api::run(args.api_config(), db, listener, shutdown).await
}

impl SimArgs {
    pub fn sim_config(&self) -> observer_sim::SimConfig {
        observer_sim::SimConfig {
            port: self.port,
            bot_token: self.bot_token.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            seed: self.seed,
            ..observer_sim::SimConfig::default()
        }
    }
}

pub async fn run_sim(args: SimArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let sim = observer_sim::start_on(addr, args.sim_config())
        .await
        .with_context(|| format!("starting the simulator on {addr}"))?;
    sim.load(observer_sim::Scenario::generate(
        args.seed,
        observer_sim::GenOptions::default(),
    ));
    let _traffic = (args.traffic_rate > 0.0).then(|| {
        sim.start_traffic(observer_sim::TrafficOptions {
            rate_per_sec: args.traffic_rate,
            seed: args.seed,
            ..observer_sim::TrafficOptions::default()
        })
    });
    // The one line scripts wait for; keep its shape stable.
    println!("simulator listening on {}", sim.base_url());
    println!(
        "bot token {:?}, OAuth client {:?} / {:?}; control API under {}/_sim/ (see crates/sim/README.md)",
        args.bot_token,
        args.client_id,
        args.client_secret,
        sim.base_url()
    );
    shutdown.await;
    sim.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(extra: &[&str]) -> anyhow::Result<observer_worker::Config> {
        let mut argv = vec![
            "observer",
            "worker",
            "--database-url",
            "postgres://x",
            "--discord-token",
            "t",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Worker(w) => w.worker_config(),
            other => anyhow::bail!("parsed as {other:?}"),
        }
    }

    #[test]
    fn shard_flags_map_to_the_worker() -> anyhow::Result<()> {
        let c = worker(&["--shards", "0-3", "--shard-count", "8"])?;
        assert_eq!(
            c.shards,
            Some(observer_worker::ShardRange {
                first: 0,
                last: 3,
                count: 8
            })
        );
        let c = worker(&["--shard-count", "2"])?;
        assert_eq!(
            c.shards,
            Some(observer_worker::ShardRange {
                first: 0,
                last: 1,
                count: 2
            })
        );
        assert_eq!(worker(&[])?.shards, None);
        assert!(worker(&["--shards", "3-1", "--shard-count", "8"]).is_err());
        assert!(worker(&["--shards", "0-8", "--shard-count", "8"]).is_err());
        assert!(worker(&["--metrics-addr", "not an address"]).is_err());
        assert_eq!(worker(&["--metrics-addr", ""])?.metrics_addr, None);
        Ok(())
    }

    /// Secrets set in the environment appear neither in `--help` nor in the
    /// parsed arguments' `Debug` output.
    #[test]
    fn secrets_stay_out_of_help_and_debug() {
        use clap::CommandFactory;
        let secrets = [
            ("DATABASE_URL", "postgres://u:db-pass-sentinel@h/d"),
            ("DISCORD_TOKEN", "token-sentinel"),
            ("DISCORD_CLIENT_SECRET", "client-secret-sentinel"),
        ];
        let mut cmd = Cli::command();
        for sub in ["migrate", "worker", "api", "demo"] {
            let sub = cmd.find_subcommand_mut(sub).expect("subcommand");
            for arg in sub.get_arguments() {
                if let Some(env) = arg.get_env().and_then(|e| e.to_str()) {
                    if secrets.iter().any(|(name, _)| *name == env) {
                        assert!(arg.is_hide_env_values_set(), "{env} shown in --help");
                    }
                }
            }
        }
        // The rendered help, with the variables really set (clap reads them
        // when the command is built). Only this test sets them, to sentinels.
        for (name, value) in secrets {
            std::env::set_var(name, value);
        }
        let mut cmd = Cli::command();
        for sub in ["migrate", "worker", "api", "demo"] {
            let help = cmd
                .find_subcommand_mut(sub)
                .expect("subcommand")
                .render_long_help()
                .to_string();
            for (name, value) in secrets {
                assert!(!help.contains(value), "{name} value in `{sub} --help`");
            }
        }
        let parsed = Cli::try_parse_from(["observer", "api", "--discord-client-id", "1"])
            .expect("parses from env");
        let worker = Cli::try_parse_from(["observer", "worker"]).expect("parses from env");
        for (name, _) in secrets {
            std::env::remove_var(name);
        }
        let shown = format!("{parsed:?} {worker:?}");
        for (name, value) in secrets {
            assert!(!shown.contains(value), "{name} in Debug output: {shown}");
        }
        assert!(shown.contains("database_url"), "{shown}");
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn worker_requires_shard_count_with_shards() {
        let r = Cli::try_parse_from([
            "observer",
            "worker",
            "--database-url",
            "postgres://x",
            "--discord-token",
            "t",
            "--shards",
            "0-3",
        ]);
        assert!(r.is_err());
    }
}
