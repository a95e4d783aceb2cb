//! Idle-client memory: open many authenticated connections that each ran
//! one `SELECT 1`, hold them, and report how the watched processes' RSS grew.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::BytesMut;
use pgferry_protocol::encode;
use tokio::task::JoinSet;

use crate::cli::{Args, Target};
use crate::conn::ConnParams;
use crate::procfs;
use crate::round::connect_all;
use crate::stats::{json_str, Recorder};

/// Time the servers get to settle after the last connection is up and
/// before the next target starts.
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run(args: &Args, clients: usize) -> Result<()> {
    let mut select1 = BytesMut::new();
    encode::query(&mut select1, b"SELECT 1");
    let tls = args.tls_connector()?;
    for target in &args.targets {
        let params = args.conn_params(target, tls.as_ref());
        run_target(args, target, &params, clients, select1.to_vec()).await?;
        tokio::time::sleep(SETTLE).await;
    }
    Ok(())
}

fn cpu_all(args: &Args) -> Vec<Option<u64>> {
    args.pids.iter().map(|(_, pid)| procfs::cpu_micros(*pid).ok()).collect()
}

fn rss_all(args: &Args) -> Vec<Option<u64>> {
    args.pids.iter().map(|(_, pid)| procfs::rss_kib(*pid).ok()).collect()
}

fn mib(kib: u64) -> String {
    format!("{:.1}MiB", kib as f64 / 1024.0)
}

async fn run_target(
    args: &Args,
    target: &Target,
    params: &Arc<ConnParams>,
    clients: usize,
    select1: Vec<u8>,
) -> Result<()> {
    let recorder = Recorder::default();
    let before = rss_all(args);
    let cpu_before = cpu_all(args);
    let start = Instant::now();
    let conns = connect_all(params, clients, args.connect_concurrency, Some(select1), &recorder).await;
    let connect_secs = start.elapsed().as_secs_f64();
    let cpu_after = cpu_all(args);
    let connected = conns.len();
    println!(
        "idle target={} clients={} connected={} connect_time={:.2}s rate={:.0}/s hold={:?}",
        target.name,
        clients,
        connected,
        connect_secs,
        connected as f64 / connect_secs,
        args.hold
    );
    for m in recorder.messages() {
        println!("idle target={} error: {m}", target.name);
    }
    tokio::time::sleep(args.hold).await;
    let held = rss_all(args);
    // CPU per login: what each process spent while the connections were
    // made (startup, SCRAM, the first SELECT 1), per connection.
    for ((name, pid), (c0, c1)) in args.pids.iter().zip(cpu_before.iter().zip(&cpu_after)) {
        if let (Some(c0), Some(c1)) = (c0, c1) {
            if connected > 0 && c1 > c0 {
                println!(
                    "idle target={} process={name} pid={pid} cpu_per_login={:.1}us",
                    target.name,
                    (c1 - c0) as f64 / connected as f64
                );
            }
        }
    }
    for (((name, pid), b), h) in args.pids.iter().zip(&before).zip(&held) {
        let (Some(b), Some(h)) = (b, h) else {
            println!("idle target={} process={name} pid={pid}: RSS not readable", target.name);
            continue;
        };
        let delta = h.saturating_sub(*b);
        let per_client = if connected > 0 {
            delta as f64 * 1024.0 / connected as f64
        } else {
            f64::NAN
        };
        println!(
            "idle target={} process={name} pid={pid} rss_before={} rss_held={} delta={} per_client={:.0}B ({:.1}KiB)",
            target.name,
            mib(*b),
            mib(*h),
            mib(delta),
            per_client,
            per_client / 1024.0
        );
        if args.json {
            println!(
                "{{\"mode\":\"idle\",\"target\":{},\"process\":{},\"pid\":{pid},\"clients\":{clients},\"connected\":{connected},\"connect_seconds\":{connect_secs:.3},\"rss_before_kib\":{b},\"rss_held_kib\":{h},\"bytes_per_client\":{per_client:.1}}}",
                json_str(&target.name),
                json_str(name)
            );
        }
    }
    let mut closing = JoinSet::new();
    for c in conns {
        closing.spawn(c.terminate());
    }
    while closing.join_next().await.is_some() {}
    if let Some(after) = args.after {
        tokio::time::sleep(after).await;
        for (((name, pid), b), a) in args.pids.iter().zip(&before).zip(rss_all(args)) {
            if let (Some(b), Some(a)) = (b, a) {
                println!(
                    "idle target={} process={name} pid={pid} rss_before={} rss_{}s_after_close={}",
                    target.name,
                    mib(*b),
                    after.as_secs(),
                    mib(a)
                );
            }
        }
    }
    Ok(())
}
