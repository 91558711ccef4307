//! A private PostgreSQL cluster started from the machine's installed server
//! binaries (initdb, pg_ctl): `observer demo` uses one when `DATABASE_URL` is
//! unset, and tests that must restart PostgreSQL use their own so they never
//! disturb the shared server.
//!
//! PostgreSQL refuses to run as root, so as root the cluster is created and
//! started as the `postgres` system user (which Debian's server package creates).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Why a private cluster could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) found. Install them, e.g. \
         `sudo apt-get install postgresql` (Debian/Ubuntu) or `brew install postgresql@16` \
         (macOS), set PG_BIN_DIR to their folder, or set DATABASE_URL to an existing database"
    )]
    NotInstalled,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {output}")]
    Failed { tool: String, output: String },
}

/// A private cluster. Stop it with [`PrivatePostgres::stop`]; the data folder stays.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    run_as: Option<String>,
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

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

impl PrivatePostgres {
    /// Initialises `data_dir` if needed and starts a server on 127.0.0.1:`port`
    /// (trust authentication, superuser `postgres`).
    pub async fn start(data_dir: &Path, port: u16) -> Result<Self, ServerError> {
        let bin = find_bin_dir().ok_or(ServerError::NotInstalled)?;
        std::fs::create_dir_all(data_dir)
            .map_err(io(format!("creating {}", data_dir.display())))?;
        let data = data_dir
            .canonicalize()
            .map_err(io(format!("resolving {}", data_dir.display())))?
            .join("pg");
        let run_as = if is_root().await {
            Some("postgres".to_string())
        } else {
            None
        };
        let this = Self {
            bin,
            data,
            port,
            run_as,
        };
        if !this.data.join("PG_VERSION").exists() {
            std::fs::create_dir_all(&this.data)
                .map_err(io(format!("creating {}", this.data.display())))?;
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
        // A server left running by an earlier run answers `status`; reuse it.
        if !this.is_running().await {
            this.start_server().await?;
        }
        Ok(this)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn is_running(&self) -> bool {
        let data = self.data.display().to_string();
        self.pg("pg_ctl", &["-D", &data, "status"]).await.is_ok()
    }

    async fn start_server(&self) -> Result<(), ServerError> {
        let data = self.data.display().to_string();
        let log = self.data.join("server.log").display().to_string();
        let opts = format!("-p {} -c listen_addresses=127.0.0.1 -k {data}", self.port);
        self.pg(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start",
            ],
        )
        .await
    }

    /// Fast shutdown (open connections are terminated), then start again.
    pub async fn restart(&self) -> Result<(), ServerError> {
        let data = self.data.display().to_string();
        self.pg("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])
            .await?;
        self.start_server().await
    }

    async fn chown_for_server(&self) -> Result<(), ServerError> {
        if let Some(user) = &self.run_as {
            let dir = self.data.display().to_string();
            let status = Command::new("chown")
                .args(["-R", user, &dir])
                .status()
                .await
                .map_err(io("running chown"))?;
            if !status.success() {
                return Err(ServerError::Failed {
                    tool: "chown".into(),
                    output: format!("cannot hand {dir} to the {user} user (running as root)"),
                });
            }
        }
        Ok(())
    }

    async fn pg(&self, tool: &str, args: &[&str]) -> Result<(), ServerError> {
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
            .map_err(io(format!("running {}", exe.display())))?;
        if !out.status.success() {
            return Err(ServerError::Failed {
                tool: tool.into(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(())
    }

    /// Fast shutdown; the data folder stays for the next run.
    pub async fn stop(self) {
        let data = self.data.display().to_string();
        if let Err(err) = self
            .pg("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])
            .await
        {
            tracing::warn!(%err, "stopping the private PostgreSQL");
        }
    }
}
