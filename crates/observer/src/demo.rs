//! `observer demo`: the whole system on one machine with no accounts.
//!
//! PostgreSQL (private unless `DATABASE_URL` is set) → migrate → the Discord
//! simulator with a generated support organisation and synthetic traffic → the
//! worker ingesting it through the real gateway protocol → the api, whose
//! "Log in with Discord" goes to the simulator's user picker.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use observer_db::server::PrivatePostgres;

/// Port of the demo's private PostgreSQL (off the default 5432 so it never
/// collides with a system server).
const DEMO_PG_PORT: u16 = 54329;

pub async fn run(args: DemoArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (url, private) = match &args.database_url {
        Some(url) => (secrecy::ExposeSecret::expose_secret(url).to_owned(), None),
        None => {
            let pg = PrivatePostgres::start(&args.data_dir, DEMO_PG_PORT)
                .await
                .context("starting the demo's private PostgreSQL")?;
            (pg.url(), Some(pg))
        }
    };
    let result = run_with_db(&args, &url, shutdown).await;
    if let Some(pg) = private {
        pg.stop().await;
    }
    result
}

async fn run_with_db(
    args: &DemoArgs,
    url: &str,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let db = observer_db::Db::connect(url, 24)
        .await
        .with_context(|| format!("connecting to {}", redact_password(url)))?;
    observer_db::migrate::run(db.pool())
        .await
        .context("applying migrations and policies")?;

    let sim_config = observer_sim::SimConfig {
        seed: args.seed,
        ..observer_sim::SimConfig::default()
    };
    let sim = observer_sim::start_on(
        SocketAddr::from(([127, 0, 0, 1], args.sim_port)),
        sim_config,
    )
    .await
    .with_context(|| format!("starting the simulator on port {}", args.sim_port))?;
    let scenario = observer_sim::Scenario::generate(args.seed, observer_sim::GenOptions::default());
    sim.load(scenario.clone());
    // Weeks of a real support queue before the worker first connects: it
    // backfills them (archived posts through Discord's archived-thread
    // listings), so the queue and its numbers are there from the start.
    if args.support_history_days > 0 {
        let mut posts = 0;
        for g in &scenario.guilds {
            posts += sim
                .generate_support_history(g.id, args.support_history_days, args.seed)
                .with_context(|| format!("generating support history for guild {}", g.id))?
                .threads
                .len();
        }
        tracing::info!(
            posts,
            days = args.support_history_days,
            "simulator holds back-dated support history"
        );
    }
    // Dropping the handle stops the traffic: keep it for the life of the demo.
    let _traffic = (args.traffic_rate > 0.0).then(|| {
        sim.start_traffic(observer_sim::TrafficOptions {
            rate_per_sec: args.traffic_rate,
            seed: args.seed,
            ..observer_sim::TrafficOptions::default()
        })
    });

    let stop = CancellationToken::new();
    let mut worker_config = observer_worker::Config::new(sim.config().bot_token.clone());
    worker_config.api_base_url = sim.base_url();
    let worker = tokio::spawn(observer_worker::run(
        worker_config,
        db.clone(),
        stop.clone().cancelled_owned(),
    ));

    let public_url = format!("http://localhost:{}", args.port);
    let api_config = observer_api::Config {
        public_url: public_url.clone(),
        discord_client_id: sim.config().client_id.clone(),
        discord_client_secret: sim.config().client_secret.clone().into(),
        discord_api_base_url: sim.base_url(),
        ..observer_api::Config::default()
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], args.port)))
        .await
        .with_context(|| format!("binding the api on port {}", args.port))?;
    let api = tokio::spawn(observer_api::run(
        api_config,
        db.clone(),
        listener,
        stop.clone().cancelled_owned(),
    ));

    print_welcome(&public_url, &sim.base_url(), &scenario);

    // Until Ctrl-C, or until a component stops on its own (an error worth seeing).
    let mut worker = worker;
    let mut api = api;
    let early = tokio::select! {
        () = shutdown => None,
        r = &mut worker => Some(("worker", r)),
        r = &mut api => Some(("api", r)),
    };
    stop.cancel();
    let mut failed = None;
    let mut report = |name: &str, r: Result<anyhow::Result<()>, tokio::task::JoinError>| match r {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::error!(error = format!("{err:#}"), "{name} failed");
            failed.get_or_insert(err.context(format!("{name} failed")));
        }
        Err(err) => {
            tracing::error!(%err, "{name} task panicked");
            failed.get_or_insert(anyhow::anyhow!("{name} task panicked: {err}"));
        }
    };
    match early {
        Some(("worker", r)) => {
            report("worker", r);
            report("api", api.await);
        }
        Some((_, r)) => {
            report("api", r);
            report("worker", worker.await);
        }
        None => {
            report("worker", worker.await);
            report("api", api.await);
        }
    }
    sim.shutdown().await;
    failed.map_or(Ok(()), Err)
}

fn print_welcome(public_url: &str, sim_url: &str, scenario: &observer_sim::Scenario) {
    println!();
    println!("Support Observer demo is running.");
    println!("  dashboard and GraphiQL: {public_url}/  and  {public_url}/graphql");
    println!("  log in:                 {public_url}/auth/login  (the simulated Discord asks which user you are)");
    println!("  Discord simulator:      {sim_url}  (control API: {sim_url}/_sim/, see crates/sim/README.md)");
    println!();
    println!("Demo users (what each may see differs by role):");
    for user in scenario.users.iter().filter(|u| !u.bot).take(12) {
        let mut places = Vec::new();
        for guild in &scenario.guilds {
            let Some(member) = guild.members.iter().find(|m| m.user_id == user.id) else {
                continue;
            };
            let roles: Vec<&str> = guild
                .roles
                .iter()
                .filter(|r| member.roles.contains(&r.id))
                .map(|r| r.name.as_str())
                .collect();
            let owner = if guild.owner_id == user.id {
                " owner"
            } else {
                ""
            };
            places.push(format!("{}{owner} [{}]", guild.name, roles.join(", ")));
        }
        if !places.is_empty() {
            println!("  {:<18} {}", user.username, places.join("; "));
        }
    }
    println!();
    println!("Press Ctrl-C to stop.");
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for messages.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_password;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("postgres://u:p%40ss@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_password("not a url"), "not a url");
    }
}
