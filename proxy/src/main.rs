//! The `pgferry` binary: command line, logging, runtime, signals.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "pgferry",
    version,
    about = "Citus-aware PostgreSQL proxy and transaction pooler"
)]
struct Cli {
    /// Configuration file to run with.
    #[arg(long, value_name = "FILE", required_unless_present = "check_config")]
    config: Option<PathBuf>,
    /// Validate a configuration file (and the users file it names), then exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGFERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    if let Some(path) = cli.check_config {
        let config = pgferry_config::Config::load(&path)?;
        let users = pgferry_proxy::load_userlist(&config)?;
        println!("{}: OK ({} users)", path.display(), users.len());
        return Ok(());
    }
    let path = cli.config.expect("clap requires --config");
    let config = pgferry_config::Config::load(&path).with_context(|| format!("loading {}", path.display()))?;
    raise_nofile_limit();

    // One thread (the default on two cores or fewer): a single event loop
    // (tokio's current-thread scheduler), measured 7-16% less CPU per
    // transaction than a one-worker multi-thread runtime. Thread per core:
    // this thread is loop 0 and `run` starts the others. Otherwise one
    // work-stealing runtime. BENCHMARKS.md (sessions 10 and 13) compares them.
    let mut rt = match (config.runtime.scheduler, config.runtime.threads()) {
        (pgferry_config::Scheduler::ThreadPerCore, _) | (_, 1) => tokio::runtime::Builder::new_current_thread(),
        (pgferry_config::Scheduler::WorkStealing, n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = rt.enable_all().build()?;
    rt.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(trim_heap_every(TRIM_EVERY));
        let mut server = tokio::spawn(pgferry_proxy::run(config, Some(path), rx));
        tokio::select! {
            r = &mut server => return r.context("proxy task")?.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: exiting now");
                return Ok(());
            }
            _ = term.recv() => tracing::info!("SIGTERM: graceful shutdown (SIGINT or a second SIGTERM: exit now)"),
        }
        // Stop accepting, let transactions finish (up to shutdown_timeout).
        let _ = tx.send(true);
        tokio::select! {
            r = &mut server => r.context("proxy task")?.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    })
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The system allocator, with clients' long-lived state in a slab of its own
/// (see memory.rs: what makes a parked client's memory go back to the kernel).
#[cfg(not(feature = "mimalloc"))]
#[global_allocator]
static ALLOC: pgferry_proxy::memory::Allocator = pgferry_proxy::memory::Allocator;

/// How often freed heap memory is handed back to the kernel.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// glibc's malloc keeps what a burst freed (thousands of clients leaving, a
/// stall that piled up requests) and RSS stays at the burst's high-water
/// mark. `malloc_trim` returns whole free pages to the kernel; it runs off
/// the event loops, as it walks every arena under its lock.
async fn trim_heap_every(period: std::time::Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let _ = tokio::task::spawn_blocking(trim_heap).await;
    }
}

#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own
    // arenas; it takes their locks and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// 10k clients need 10k descriptors: lift the soft limit to the hard one.
fn raise_nofile_limit() {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-files limit");
    }
}
