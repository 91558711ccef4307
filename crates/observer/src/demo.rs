//! `observer demo`: the whole system on one machine with no accounts.

use std::future::Future;

use crate::cli::DemoArgs;

pub async fn run(_args: DemoArgs, _shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::bail!("`observer demo` is not wired yet")
}
