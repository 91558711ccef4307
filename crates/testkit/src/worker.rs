//! The real worker in-process against the simulator, stopped gracefully
//! (what SIGTERM does) or killed where it stands.

use std::sync::Arc;
use std::time::Duration;

use observer_db::Db;
use observer_sim::Simulator;
use observer_worker::{Config, Metrics};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A worker config for `sim`'s bot, with short intervals for tests.
pub fn config(sim: &Simulator) -> Config {
    let mut c = Config::new(sim.config().bot_token.clone());
    c.api_base_url = sim.base_url();
    c.log_interval = Duration::from_secs(5);
    c.backfill_overlap = Duration::from_secs(30);
    c
}

pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<anyhow::Result<()>>,
    pub metrics: Arc<Metrics>,
}

/// Spawns the worker on the current runtime.
pub fn start(config: Config, db: Db) -> Running {
    let (tx, rx) = oneshot::channel::<()>();
    let metrics = Metrics::new();
    let m = Arc::clone(&metrics);
    let task = tokio::spawn(async move {
        observer_worker::run_with_metrics(config, db, m, async move {
            let _ = rx.await;
        })
        .await
    });
    Running {
        stop: Some(tx),
        task,
        metrics,
    }
}

impl Running {
    /// Graceful stop (what SIGTERM does); the worker's own error if it failed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await???;
        Ok(())
    }

    /// Abrupt death: the task is dropped wherever it is, queued ops are lost.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
