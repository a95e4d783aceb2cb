//! pgferry-loadtest: a lean PostgreSQL wire-protocol load generator for
//! comparing pgferry with PgBouncer and direct PostgreSQL. See README.md.

mod cli;
mod conn;
mod idle;
mod procfs;
mod round;
mod soak;
mod stats;
mod tls;
mod workload;

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use crate::cli::{Args, WorkloadKind};
use crate::conn::{Conn, ConnParams};
use crate::round::Settings;
use crate::workload::Scale;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("pgferry-loadtest: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    args.validate()?;
    procfs::default_sigpipe();
    let nofile = procfs::raise_nofile_limit()?;
    let wanted = args.idle_clients.unwrap_or(args.clients) as u64 + 64;
    if nofile < wanted {
        eprintln!("warning: RLIMIT_NOFILE is {nofile}, below the {wanted} descriptors this run needs");
    }
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    if let Some(n) = args.idle_clients {
        return idle::run(&args, n).await;
    }
    let tls = args.tls_connector()?;
    let params: Vec<_> = args.targets.iter().map(|t| args.conn_params(t, tls.as_ref())).collect();
    if let Some(d) = args.soak {
        let scale = scale(&args, &params).await?;
        return soak::run(&args, d, scale).await;
    }
    describe_tls(&args, &params).await;
    let scale = scale(&args, &params).await?;
    let settings = Settings {
        kind: args.workload,
        scale,
        clients: args.clients,
        warmup: args.warmup,
        duration: args.duration,
        think: args.think,
        rate: args.rate,
        connect_concurrency: args.connect_concurrency,
    };
    let n = args.targets.len();
    let mut results = Vec::new();
    for round in 1..=args.rounds {
        // Rotate the starting target so that none always runs first.
        for k in 0..n {
            let i = (round - 1 + k) % n;
            let t = &args.targets[i];
            match round::run(round, &t.name, &params[i], &settings, args.pid_of(&t.name)).await {
                Ok((result, messages)) => {
                    println!("{}", result.line());
                    for m in messages {
                        println!("round={round} target={} error: {m}", t.name);
                    }
                    if args.json {
                        println!("{}", result.json());
                    }
                    results.push(result);
                }
                Err(e) => println!(
                    "round={round} target={} clients={} workload={} failed: {e:#}",
                    t.name,
                    args.clients,
                    args.workload.name()
                ),
            }
        }
    }
    let names: Vec<String> = args.targets.iter().map(|t| t.name.clone()).collect();
    print!("{}", stats::summary(&names, &results));
    if results.is_empty() {
        bail!("no round produced a result");
    }
    Ok(())
}

/// Prints what one connection to each TLS target negotiated.
async fn describe_tls(args: &Args, params: &[Arc<ConnParams>]) {
    for (t, params) in args.targets.iter().zip(params) {
        if !args.uses_tls(t) {
            continue;
        }
        match Conn::connect(params).await {
            Ok(c) => {
                let d = c.tls_description().unwrap_or_default();
                println!("tls target={} {d}", t.name);
                c.terminate().await;
            }
            Err(e) => println!("tls target={} probe failed: {e:#}", t.name),
        }
    }
}

/// pgbench's scale: from --scale, else counted in pgbench_branches on the
/// first target that answers.
async fn scale(args: &Args, params: &[Arc<ConnParams>]) -> Result<Scale> {
    if let Some(s) = args.scale {
        return Ok(Scale::new(s, args.pgbench_accounts));
    }
    if !args.workload.uses_pgbench_tables() {
        return Ok(Scale::new(1, args.pgbench_accounts));
    }
    if args.workload != WorkloadKind::Write {
        if let Some(a) = args.pgbench_accounts {
            return Ok(Scale::new(1, Some(a)));
        }
    }
    let mut last = anyhow!("no target");
    for (t, params) in args.targets.iter().zip(params) {
        let attempt = async {
            let mut c = Conn::connect(params).await?;
            let v = c.query_scalar("SELECT count(*) FROM pgbench_branches").await?;
            c.terminate().await;
            let n: u64 = v.context("no row")?.parse().context("count(*)")?;
            Ok::<_, anyhow::Error>(n)
        };
        match attempt.await {
            Ok(n) => {
                eprintln!("pgbench scale {n} (counted in pgbench_branches via {})", t.name);
                return Ok(Scale::new(n, args.pgbench_accounts));
            }
            Err(e) => last = e.context(format!("target {}", t.name)),
        }
    }
    Err(last.context("cannot determine the pgbench scale; pass --scale"))
}
