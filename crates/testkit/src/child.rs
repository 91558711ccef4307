//! Running one test of the current test binary as a child process, for tests
//! that need a process of their own (a global log subscriber that must see
//! only their own logs, a process to SIGKILL) while the other tests of the
//! binary run concurrently in this one.

use std::process::Command;

use sqlx::PgPool;

/// The harness name of test `name` in the module whose `module_path!()` is
/// `module`: the binary's crate name is not part of it (`it::e2e` → `e2e::name`).
pub fn test_name(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_, rest)) => format!("{rest}::{name}"),
        None => name.to_owned(),
    }
}

/// This binary, running exactly the test `test` (see [`test_name`]) with its
/// output uncaptured.
pub fn command(test: &str) -> std::io::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"]);
    Ok(cmd)
}

/// Set in the child [`alone`] starts.
const ALONE: &str = "OBSERVER_TEST_ALONE";

/// For a `#[sqlx::test]` that needs a process of its own. In the shared test
/// process: closes `pool`, runs test `name` (of the module whose
/// `module_path!()` is `module`) again in a child, fails if the child failed,
/// and returns `None` (the caller returns). In that child: returns the pool
/// (the caller runs its body).
///
/// The pool is closed first because the child's `#[sqlx::test]` gets the same
/// database name (sqlx derives it from the test's path) and drops it on start.
pub async fn alone(module: &str, name: &str, pool: PgPool) -> anyhow::Result<Option<PgPool>> {
    if std::env::var_os(ALONE).is_some() {
        return Ok(Some(pool));
    }
    pool.close().await;
    let test = test_name(module, name);
    let mut cmd = command(&test)?;
    cmd.env(ALONE, "1");
    let out = tokio::process::Command::from(cmd).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "{test} in its own process: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(None)
}
