use super::*;

/// Lines from the client process, one at a time.
pub(super) struct Child {
    pub(super) proc: tokio::process::Child,
    pub(super) stdin: tokio::process::ChildStdin,
    pub(super) lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn expect(&mut self, word: &str, limit: Duration) -> anyhow::Result<String> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .with_context(|| format!("client did not say {word:?} within {limit:?}"))??
            .with_context(|| format!("client exited before {word:?}"))?;
        match line.strip_prefix(word) {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => bail!("client said {line:?}, expected {word:?}"),
        }
    }
}

/// The Discord side of the server process: the simulator and the worker on
/// their own runtimes, and the worker's database and metrics.
struct Server {
    side: tokio::runtime::Runtime,
    worker_rt: tokio::runtime::Runtime,
    sim: Simulator,
    worker_db: observer_db::Db,
    wmetrics: Arc<observer_worker::Metrics>,
    wstop_tx: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The API under test and how to reach it.
struct Api {
    base: String,
    http: reqwest::Client,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The bench world's ids as the database stores them.
struct Ids {
    viewers: Vec<i64>,
    guilds: Vec<i64>,
    channels: Vec<i64>,
}

impl Ids {
    fn of(world: &World) -> Self {
        Self {
            viewers: world.viewers.iter().map(|v| *v as i64).collect(),
            guilds: world.guild_ids.iter().map(|g| *g as i64).collect(),
            channels: world.channels.iter().map(|c| c.1 as i64).collect(),
        }
    }
}

/// Everything measured around posting and draining.
struct Run {
    total: usize,
    first_post: u64,
    post_time: Duration,
    behind: Duration,
    expected: Vec<u64>,
    expected_total: u64,
    report: Value,
    m0: HashMap<String, f64>,
    m1: HashMap<String, f64>,
    w0: HashMap<String, f64>,
    w1: HashMap<String, f64>,
    s0: DbStats,
    s1: DbStats,
    cpu0: (Option<f64>, Option<f64>),
    cpu1: (Option<f64>, Option<f64>),
}

pub(super) async fn bench(url: &str, a: &Args) -> anyhow::Result<()> {
    let setup = Instant::now();
    println!(
        "fanout_bench: {} viewers, {} msg/s for {} s, {} guilds × ({} team roles/channels + {} public), role probability {}, {} client threads; load average at start {}",
        a.viewers, a.rate, a.seconds, a.guilds, a.roles, a.public_channels, a.role_prob, a.client_threads, load_average()
    );
    let (server, world) = Server::start(url, a).await?;
    let ids = Ids::of(&world);
    server.wait_mirrored(&ids).await?;
    let secrets = create_tokens(&server.worker_db, &ids.viewers).await?;
    let visible = expected_visibility(&server.worker_db, &ids).await?;
    check_construction(&world, &visible)?;
    let distinct_sets = world.held.values().collect::<HashSet<_>>().len();
    let avg_visible =
        visible.iter().map(BTreeSet::len).sum::<usize>() as f64 / visible.len() as f64;

    let api = server.start_api(url, a).await?;
    println!(
        "setup: world mirrored, {} tokens, API up in {:.1} s; {} distinct role sets; a viewer sees {:.2} of {} bench channels on average",
        secrets.len(),
        setup.elapsed().as_secs_f64(),
        distinct_sets,
        avg_visible,
        ids.channels.len()
    );

    let mut child = spawn_client(a, &api.base, &ids.viewers, &secrets, &visible).await?;
    connect_and_subscribe(&mut child, &api, a).await?;
    let run = post_and_drain(&server, &api, &mut child, &world, &visible, a).await?;
    let violations = report(&run);
    server.shutdown(api, child).await?;
    if violations > 0 {
        bail!("{violations} frames reached a viewer who may not see their channel");
    }
    Ok(())
}

// The simulator and the worker each get their own runtime thread, as
// they would be their own processes in production: sharing the API's
// runtime would queue Discord's side behind a thousand WebSocket tasks,
// and sharing one thread would hold the worker's database round trips
// behind the simulator's posting.
fn start_side_runtimes() -> anyhow::Result<(tokio::runtime::Runtime, tokio::runtime::Runtime)> {
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sim")
        .enable_all()
        .build()?;
    let worker_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("worker")
        .enable_all()
        .build()?;
    Ok((side, worker_rt))
}

impl Server {
    /// The scratch database migrated, the simulator loaded with the bench
    /// world, and the worker started against both.
    async fn start(url: &str, a: &Args) -> anyhow::Result<(Server, World)> {
        let worker_db = observer_db::Db::connect(url, 8).await?;
        observer_db::migrate::run(worker_db.pool()).await?;
        let (side, worker_rt) = start_side_runtimes()?;
        let sim = side
            .spawn(Simulator::start(SimConfig {
                rate_limit_per_route: 0,
                ..SimConfig::default()
            }))
            .await??;
        let mut sc = Scenario::generate(
            a.seed,
            GenOptions {
                guilds: a.guilds,
                ..GenOptions::default()
            },
        );
        let world = build_world(&mut sc, a)?;
        sim.load(sc);

        let mut wconf = observer_worker::Config::new(sim.config().bot_token.clone());
        wconf.api_base_url = sim.base_url();
        wconf.backfill = false;
        wconf.log_interval = Duration::from_secs(3600);
        let (wstop_tx, wstop_rx) = tokio::sync::oneshot::channel::<()>();
        let wmetrics = observer_worker::Metrics::new();
        // Its own pool, opened on its own runtime: a connection's socket is
        // driven by the reactor of the runtime that opened it, and the API's is
        // busy.
        let own_url = url.to_owned();
        let ingest_db = worker_rt
            .spawn(async move { observer_db::Db::connect(&own_url, 8).await })
            .await??;
        let worker = worker_rt.spawn(observer_worker::run_with_metrics(
            wconf,
            ingest_db,
            Arc::clone(&wmetrics),
            async move {
                let _ = wstop_rx.await;
            },
        ));
        let server = Server {
            side,
            worker_rt,
            sim,
            worker_db,
            wmetrics,
            wstop_tx,
            worker,
        };
        Ok((server, world))
    }

    async fn wait_mirrored(&self, ids: &Ids) -> anyhow::Result<()> {
        let want_members = (ids.viewers.len() * ids.guilds.len()) as i64;
        let want_channels = ids.channels.len() as i64;
        let pool = self.worker_db.pool();
        wait_for(
            "the worker to mirror the world",
            Duration::from_secs(60),
            || {
                let (viewer_ids, bench_channels) = (&ids.viewers, &ids.channels);
                async move {
                    let members: i64 =
                        sqlx::query_scalar("select count(*) from members where user_id = any($1)")
                            .bind(viewer_ids)
                            .fetch_one(pool)
                            .await?;
                    let channels: i64 = sqlx::query_scalar(
                        "select count(*) from channels where channel_id = any($1)",
                    )
                    .bind(bench_channels)
                    .fetch_one(pool)
                    .await?;
                    Ok(members >= want_members && channels >= want_channels)
                }
            },
        )
        .await
    }

    async fn start_api(&self, url: &str, a: &Args) -> anyhow::Result<Api> {
        let api_db = observer_db::Db::connect(url, a.api_pool).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let config = observer_api::Config {
            public_url: base.clone(),
            discord_api_base_url: self.sim.base_url(),
            limits: observer_api::Limits {
                rate_burst: u32::MAX,
                rate_per_sec: 1e9,
                ..Default::default()
            },
            ..Default::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(observer_api::run(config, api_db, listener, async move {
            let _ = stop_rx.await;
        }));
        let http = reqwest::Client::new();
        wait_for("the API", Duration::from_secs(30), || {
            let (http, base) = (&http, &base);
            async move {
                Ok(http
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()))
            }
        })
        .await?;
        Ok(Api {
            base,
            http,
            stop_tx,
            task,
        })
    }

    async fn shutdown(self, api: Api, mut child: Child) -> anyhow::Result<()> {
        let _ = child.proc.wait().await;
        let _ = api.stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), api.task).await;
        let _ = self.wstop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.worker).await;
        let sim = self.sim;
        self.side.spawn(async move { sim.shutdown().await }).await?;
        self.side.shutdown_background();
        self.worker_rt.shutdown_background();
        Ok(())
    }
}

/// Users and one API token per viewer; returns the token secrets.
async fn create_tokens(db: &observer_db::Db, viewer_ids: &[i64]) -> anyhow::Result<Vec<String>> {
    let mut secrets = Vec::with_capacity(viewer_ids.len());
    let mut tx = db.auth().await?;
    for (i, v) in viewer_ids.iter().enumerate() {
        observer_db::auth::upsert_user(
            &mut tx,
            &observer_db::auth::NewUser {
                user_id: *v,
                username: format!("viewer{i}"),
                global_name: None,
                avatar: None,
            },
        )
        .await?;
    }
    tx.commit().await?;
    for v in viewer_ids {
        let secret = observer_api::tokens::new_secret();
        let mut tx = db.viewer(*v).await?;
        observer_db::viewer::create_api_token(
            &mut tx,
            *v,
            uuid::Uuid::new_v4(),
            "fanout bench",
            &observer_api::tokens::hash_secret(&secret),
        )
        .await?;
        tx.commit().await?;
        secrets.push(secret);
    }
    Ok(secrets)
}

/// Expected visibility through the Rust access rule over the mirrored data.
async fn expected_visibility(
    db: &observer_db::Db,
    ids: &Ids,
) -> anyhow::Result<Vec<BTreeSet<i64>>> {
    let mut tx = db.fanout().await?;
    let guilds = observer_db::access_data::load_guilds(&mut tx, &ids.guilds).await?;
    let members =
        observer_db::access_data::load_members(&mut tx, &ids.guilds, &ids.viewers).await?;
    tx.commit().await?;
    let now = chrono::Utc::now();
    let bench: HashSet<i64> = ids.channels.iter().copied().collect();
    Ok(ids
        .viewers
        .iter()
        .map(|v| {
            guilds
                .values()
                .flat_map(|g| {
                    observer_db::access::visible_channels(g, members.get(&(g.guild_id, *v)), now)
                        .into_iter()
                        .filter(|(_, a)| a.read)
                        .map(|(c, _)| c)
                })
                .filter(|c| bench.contains(c))
                .collect()
        })
        .collect())
}

/// The construction says the same: public channels plus those of held roles.
fn check_construction(world: &World, visible: &[BTreeSet<i64>]) -> anyhow::Result<()> {
    for (i, v) in world.viewers.iter().enumerate() {
        let held = world.held.get(v).cloned().unwrap_or_default();
        let constructed: BTreeSet<i64> = world
            .channel_role
            .iter()
            .filter(|(_, r)| r.is_none_or(|r| held.contains(&r)))
            .map(|(c, _)| *c as i64)
            .collect();
        if constructed != visible[i] {
            bail!("viewer {v}: observer_db::access disagrees with the construction");
        }
    }
    Ok(())
}

/// The clients, in their own process, told where to connect and as whom.
async fn spawn_client(
    a: &Args,
    base: &str,
    viewer_ids: &[i64],
    secrets: &[String],
    visible: &[BTreeSet<i64>],
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut proc = tokio::process::Command::new(exe)
        .arg("--client")
        .arg(a.client_threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the client process")?;
    let stdin = proc.stdin.take().context("client stdin")?;
    let stdout = proc.stdout.take().context("client stdout")?;
    let mut child = Child {
        proc,
        stdin,
        lines: BufReader::new(stdout).lines(),
    };
    let viewers_json: Vec<Value> = viewer_ids
        .iter()
        .zip(secrets)
        .zip(visible)
        .map(|((v, s), vis)| {
            json!({"id": v, "token": s, "visible": vis.iter().map(i64::to_string).collect::<Vec<_>>()})
        })
        .collect();
    child
        .send(
            &json!({
                "url": base.replace("http://", "ws://") + "/graphql",
                "parallel": a.connect_parallel,
                "drain_secs": a.drain_secs,
                "viewers": viewers_json,
            })
            .to_string(),
        )
        .await?;
    Ok(child)
}

/// Opens every connection, then every subscription, and prints what each
/// took in time and in the server's memory.
async fn connect_and_subscribe(child: &mut Child, api: &Api, a: &Args) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = vm_rss_kib();
    let t = Instant::now();
    child.send("connect").await?;
    child.expect("connected", Duration::from_secs(120)).await?;
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = vm_rss_kib();
    let t = Instant::now();
    child.send("subscribe").await?;
    child.expect("subscribed", Duration::from_secs(60)).await?;
    let n = a.viewers as f64;
    wait_for("every subscription to register", Duration::from_secs(60), || {
        let (http, base) = (&api.http, &api.base);
        async move {
            Ok(metric(&scrape(http, base).await?, "observer_api_live_subscribers") >= n)
        }
    })
    .await?;
    let subscribe_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss2 = vm_rss_kib();
    println!(
        "connections: {} opened and acked in {:.2} s; subscriptions registered in {:.2} s",
        a.viewers, connect_secs, subscribe_secs
    );
    match (rss0, rss1, rss2) {
        (Some(r0), Some(r1), Some(r2)) => println!(
            "server RSS: {r0} KiB before, {r1} KiB with {} idle connections, {r2} KiB with {} idle subscriptions: \
             {:.1} KiB per idle connection+subscription, {:.1} KiB per subscription alone",
            a.viewers,
            a.viewers,
            (r2 as f64 - r0 as f64) / n,
            (r2 as f64 - r1 as f64) / n
        ),
        _ => println!("server RSS: /proc/self/status unavailable"),
    }
    Ok(())
}

/// Posts `total` messages at `rate` round-robin over the bench channels;
/// returns the posts per channel, the failures, the time taken and how far
/// the poster fell behind its schedule.
fn post_at_rate(
    sim: &Simulator,
    channels: &[(u64, u64, u64)],
    rate: f64,
    total: usize,
) -> (BTreeMap<u64, u64>, usize, Duration, Duration) {
    let mut per_channel: BTreeMap<u64, u64> = BTreeMap::new();
    let mut failed = 0usize;
    let mut behind = Duration::ZERO;
    let t0 = Instant::now();
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        match due.checked_duration_since(now) {
            Some(wait) => std::thread::sleep(wait),
            None => behind = behind.max(now - due),
        }
        let (_, ch, author) = channels[i % channels.len()];
        let content = format!("{CONTENT_PREFIX} {i} {}", unix_nanos());
        match sim.post_message(ch, author, content, PostOptions::default()) {
            Ok(_) => *per_channel.entry(ch).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    (per_channel, failed, t0.elapsed(), behind)
}

async fn post_and_drain(
    server: &Server,
    api: &Api,
    child: &mut Child,
    world: &World,
    visible: &[BTreeSet<i64>],
    a: &Args,
) -> anyhow::Result<Run> {
    let m0 = scrape(&api.http, &api.base).await?;
    let w0 = parse_metrics(&server.wmetrics.render());
    let s0 = db_stats(server.worker_db.pool()).await?;
    let child_pid = child.proc.id().map(|p| p.to_string()).unwrap_or_default();
    let cpu0 = (cpu_secs("self"), cpu_secs(&child_pid));
    let total = (a.rate * a.seconds).round() as usize;
    let first_post = unix_nanos();
    let poster = tokio::task::spawn_blocking({
        let sim = server.sim.clone();
        let channels = world.channels.clone();
        let rate = a.rate;
        move || post_at_rate(&sim, &channels, rate, total)
    });
    let (per_channel, failed, post_time, behind) = poster.await?;
    if failed > 0 {
        bail!("{failed} posts failed in the simulator");
    }
    let expected: Vec<u64> = visible
        .iter()
        .map(|vis| {
            vis.iter()
                .map(|c| per_channel.get(&(*c as u64)).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let expected_total: u64 = expected.iter().sum();
    child.send(&format!("expect {expected_total}")).await?;
    let report = child
        .expect("result", Duration::from_secs(a.drain_secs + 60))
        .await?;
    let report: Value = serde_json::from_str(&report).context("client result")?;
    // The child has exited but is not yet reaped: its counters are still there.
    let cpu1 = (cpu_secs("self"), cpu_secs(&child_pid));
    let m1 = scrape(&api.http, &api.base).await?;
    let w1 = parse_metrics(&server.wmetrics.render());
    let s1 = db_stats(server.worker_db.pool()).await?;
    Ok(Run {
        total,
        first_post,
        post_time,
        behind,
        expected,
        expected_total,
        report,
        m0,
        m1,
        w0,
        w1,
        s0,
        s1,
        cpu0,
        cpu1,
    })
}

/// Prints what the run measured; returns how many frames reached a viewer
/// who may not see their channel.
fn report(run: &Run) -> u64 {
    let (violations, span) = report_delivery(run);
    report_costs(run, span);
    println!("load average at end: {}", load_average());
    violations
}

/// The posting, delivery and latency lines; returns the violations and the
/// span from the first post to the last frame, in seconds.
fn report_delivery(run: &Run) -> (u64, f64) {
    let report = &run.report;
    let received: Vec<u64> = report["per_viewer"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    let got_total: u64 = received.iter().sum();
    let short: Vec<usize> = (0..run.expected.len())
        .filter(|i| received.get(*i).copied().unwrap_or(0) != run.expected[*i])
        .collect();
    let violations = report["violations"].as_u64().unwrap_or(0);
    let last_frame = report["last_frame_unix_nanos"]
        .as_u64()
        .unwrap_or(run.first_post);
    let span = (last_frame.saturating_sub(run.first_post)) as f64 / 1e9;
    let (total, expected_total, post_time) = (run.total, run.expected_total, run.post_time);
    println!(
        "posted: {total} messages in {:.2} s ({:.0}/s; poster at most {:.1} ms behind schedule)",
        post_time.as_secs_f64(),
        total as f64 / post_time.as_secs_f64(),
        run.behind.as_secs_f64() * 1000.0
    );
    println!(
        "delivered: {got_total} of {expected_total} expected frames; {} viewers with a wrong count; {violations} frames from a channel the viewer may not see; errors: {}",
        short.len(),
        report["errors"]
    );
    println!(
        "deliveries/s: {:.0} (frames / (last frame − first dispatch) = {got_total} / {span:.2} s); offered {:.0}/s",
        got_total as f64 / span.max(1e-9),
        expected_total as f64 / post_time.as_secs_f64()
    );
    println!(
        "latency dispatch → frame: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n={})",
        report["p50_ms"], report["p90_ms"], report["p99_ms"], report["max_ms"], report["samples"]
    );
    (violations, span)
}

/// The worker, hub, database and CPU lines: what the run cost.
fn report_costs(run: &Run, span: f64) {
    let msgs = run.total as f64;
    let d = |name: &str| metric(&run.m1, name) - metric(&run.m0, name);
    let w = |name: &str| metric(&run.w1, name) - metric(&run.w0, name);
    let batches = w("observer_worker_batches_total").max(1.0);
    println!(
        "worker: {:.0} batches, {:.1} ops each, write+commit {:.2} ms, queued → committed {:.2} ms (means)",
        batches,
        w("observer_worker_batch_ops_sum") / batches,
        w("observer_worker_batch_seconds_sum") / batches * 1000.0,
        w("observer_worker_lag_seconds_sum") / w("observer_worker_lag_seconds_count").max(1.0)
            * 1000.0
    );
    let hand_off = d("observer_api_live_fanout_latency_seconds_sum")
        / d("observer_api_live_fanout_latency_seconds_count").max(1.0);
    println!(
        "hub: events {:.0}, deliveries {:.0}, slow consumers dropped {:.0}, mean hand-off (writing tx start → subscriber buffer) {:.2} ms",
        d("observer_api_live_events_total"),
        d("observer_api_live_deliveries_total"),
        d("observer_api_live_slow_consumers_dropped_total"),
        hand_off * 1000.0
    );
    let (s0, s1) = (&run.s0, &run.s1);
    println!(
        "db per message: hub reads {:.3} (of which tick {:.3}), access refreshes {:.0}; whole database (worker+api): {:.3} transactions, {:.3} message_events scans, {:.1} tuples returned, {:.1} fetched",
        d("observer_api_live_db_reads_total") / msgs,
        d("observer_api_live_db_tick_reads_total") / msgs,
        d("observer_api_live_access_refreshes_total"),
        (s1.xacts - s0.xacts) as f64 / msgs,
        (s1.event_scans - s0.event_scans) as f64 / msgs,
        (s1.tup_returned - s0.tup_returned) as f64 / msgs,
        (s1.tup_fetched - s0.tup_fetched) as f64 / msgs,
    );
    if let ((Some(s0), Some(c0)), (Some(s1), Some(c1))) = (run.cpu0, run.cpu1) {
        println!(
            "cpu during posting+drain: server process (sim+worker+api) {:.1} s, client process {:.1} s, over {span:.1} s wall",
            s1 - s0,
            c1 - c0
        );
    }
}
