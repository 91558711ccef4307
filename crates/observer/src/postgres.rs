//! A private PostgreSQL cluster for `observer demo` when `DATABASE_URL` is unset.
//!
//! Uses the machine's installed server binaries (initdb, pg_ctl). PostgreSQL
//! refuses to run as root, so as root the cluster is created and started as the
//! `postgres` system user (which Debian's server package creates).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};
use tokio::process::Command;

const INSTALL_HINT: &str =
    "no PostgreSQL server binaries (initdb, pg_ctl) found. Install them, e.g. \
`sudo apt-get install postgresql` (Debian/Ubuntu) or `brew install postgresql@16` (macOS), \
or set DATABASE_URL to an existing database.";

/// A running private cluster; stopped by [`PrivatePostgres::stop`].
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    run_as: Option<String>,
    pub url: String,
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        let p = PathBuf::from(dir);
        if p.join("initdb").exists() {
            return Some(p);
        }
    }
    // Debian/Ubuntu keep server binaries off PATH, one folder per major version.
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some(p) = versions
        .into_iter()
        .rev()
        .find(|p| p.join("initdb").exists())
    {
        return Some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
}

async fn is_root() -> bool {
    match Command::new("id").arg("-u").output().await {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim() == "0",
        Err(_) => false,
    }
}

impl PrivatePostgres {
    /// Initialises `data_dir` if needed and starts a server on 127.0.0.1:`port`.
    pub async fn start(data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = find_bin_dir().context(INSTALL_HINT)?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let data = data_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", data_dir.display()))?
            .join("pg");
        let run_as = if is_root().await {
            Some("postgres".to_string())
        } else {
            None
        };
        let this = Self {
            bin,
            data,
            run_as,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        if !this.data.join("PG_VERSION").exists() {
            std::fs::create_dir_all(&this.data)?;
            this.chown_for_server().await?;
            tracing::info!(dir = %this.data.display(), "initialising a private PostgreSQL cluster");
            let data = this.data.display().to_string();
            this.pg(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
            )
            .await?;
        }
        let data = this.data.display().to_string();
        let log = this.data.join("server.log").display().to_string();
        let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -k {data}");
        // A stale server from an earlier demo run may still be up; `status` tells.
        if this.pg("pg_ctl", &["-D", &data, "status"]).await.is_err() {
            this.pg(
                "pg_ctl",
                &[
                    "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start",
                ],
            )
            .await
            .with_context(|| format!("starting PostgreSQL (log: {log})"))?;
        }
        Ok(this)
    }

    async fn chown_for_server(&self) -> anyhow::Result<()> {
        if let Some(user) = &self.run_as {
            let status = Command::new("chown")
                .args(["-R", user, &self.data.display().to_string()])
                .status()
                .await
                .context("running chown")?;
            if !status.success() {
                bail!(
                    "cannot hand {} to the {user} user (running as root)",
                    self.data.display()
                );
            }
        }
        Ok(())
    }

    async fn pg(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Fast shutdown; the data folder stays for the next demo run.
    pub async fn stop(self) {
        let data = self.data.display().to_string();
        if let Err(err) = self
            .pg("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])
            .await
        {
            tracing::warn!(
                error = format!("{err:#}"),
                "stopping the private PostgreSQL"
            );
        }
    }
}
