//! Soak: many clients for a long time, mixed idle and active, connections
//! replaced all the while. Samples show whether memory, descriptors or
//! errors drift; the end compares each with its value after warm-up.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use pgferry_protocol::backend::TxStatus;
use pgferry_protocol::encode;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::cli::Args;
use crate::conn::ConnParams;
use crate::procfs;
use crate::round::{reconnect, seed};
use crate::stats::{new_histogram, Percentiles};
use crate::workload::{self, Generator, Rng, Scale};

/// Histogram shards (client % SHARDS), as in `stats::Recorder`.
const SHARDS: usize = 16;
/// Allowed RSS growth after warm-up, as the issue states it.
const RSS_GROWTH_LIMIT: f64 = 0.05;
/// Pause before a client tries again after a failed connect.
const RETRY_DELAY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Counters {
    txns: AtomicU64,
    errors: AtomicU64,
    connects: AtomicU64,
    connected: AtomicU64,
}

struct Shared {
    counters: Counters,
    window: Vec<Mutex<Histogram<u64>>>,
    messages: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, message: String) {
        self.counters.errors.fetch_add(1, Relaxed);
        let mut m = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < 10 && !m.contains(&message) {
            m.push(message);
        }
    }

    fn success(&self, client: usize, latency: Duration) {
        self.counters.txns.fetch_add(1, Relaxed);
        let mut h = self.window[client % SHARDS].lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(latency.as_micros().max(1) as u64);
    }

    /// The window's latencies, merged; the window starts again empty.
    fn take_window(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for s in &self.window {
            let mut h = s.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*h).expect("same bounds");
            h.reset();
        }
        all
    }
}

/// One process's figures at a sample.
#[derive(Clone, Copy, Default)]
struct ProcSample {
    rss_kib: u64,
    fds: u64,
    cpu_us: u64,
}

fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let pid = pid?;
    Some(ProcSample {
        rss_kib: procfs::rss_kib(pid).ok()?,
        fds: procfs::fd_count(pid).ok()?,
        cpu_us: procfs::cpu_micros(pid).ok()?,
    })
}

pub async fn run(args: &Args, duration: Duration, scale: Scale) -> Result<()> {
    let target = &args.targets[0];
    let tls = args.tls_connector()?;
    let params = args.conn_params(target, tls.as_ref());
    let pid = args.pid_of(&target.name);
    let clients = args.clients;
    let active = (clients as f64 * args.active_fraction).round() as usize;
    let period = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    println!(
        "soak target={} clients={clients} active={active} rate={}/s per active client reconnect={}/s duration={duration:?} warmup={:?} sample={:?} workload={}",
        target.name,
        args.rate,
        args.reconnect_rate,
        args.warmup,
        args.sample,
        args.workload.name()
    );
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        window: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        messages: Mutex::new(Vec::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut tasks = JoinSet::new();
    for i in 0..clients {
        let client = Client {
            id: i,
            // Active clients without a rate would spin: they run closed loop
            // only when --rate is 0, which --soak's users ask for explicitly.
            pace: (i < active).then_some(period),
            gen: Generator::new(args.workload, scale, seed(0, i)),
            rng: Rng::new(seed(1, i)),
            reconnect_rate: args.reconnect_rate,
            connect_timeout: args.connect_timeout,
            params: params.clone(),
            shared: shared.clone(),
            sem: sem.clone(),
            stop: stop_rx.clone(),
        };
        tasks.spawn(client.run());
    }

    let start = Instant::now();
    let mut tick = tokio::time::interval_at((start + args.sample).into(), args.sample);
    let mut total = new_histogram();
    let mut last = proc_sample(pid);
    let mut warm: Option<ProcSample> = None;
    let mut max_after_warm = ProcSample::default();
    let (mut txns_after_warm, mut errors_after_warm) = (0u64, 0u64);
    let mut prev_txns = 0u64;
    let mut prev_errors = 0u64;
    while start.elapsed() < duration {
        tick.tick().await;
        let t = start.elapsed();
        let window = shared.take_window();
        let c = &shared.counters;
        let txns = c.txns.load(Relaxed);
        let errors = c.errors.load(Relaxed);
        let (d_txns, d_errors) = (txns - prev_txns, errors - prev_errors);
        (prev_txns, prev_errors) = (txns, errors);
        let now = proc_sample(pid);
        let cpu = match (last, now) {
            (Some(a), Some(b)) if d_txns > 0 => format!("{:.1}us/txn", (b.cpu_us - a.cpu_us) as f64 / d_txns as f64),
            _ => "-".into(),
        };
        let l = Percentiles::of(&window);
        let procs = now.map_or("process=-".into(), |p| {
            format!("rss={:.1}MiB fds={}", p.rss_kib as f64 / 1024.0, p.fds)
        });
        println!(
            "soak t={}s connected={} tps={:.1} p50={:.3}ms p99={:.3}ms p99.9={:.3}ms errors={d_errors} connects={} {procs} cpu={cpu}",
            t.as_secs(),
            c.connected.load(Relaxed),
            d_txns as f64 / args.sample.as_secs_f64(),
            l.p50,
            l.p99,
            l.p999,
            c.connects.load(Relaxed),
        );
        if t >= args.warmup {
            match (warm, now) {
                (None, Some(p)) => {
                    warm = Some(p);
                    max_after_warm = p;
                    println!("soak warm-up over: the figures below are compared with this sample");
                }
                (Some(_), Some(p)) => {
                    max_after_warm.rss_kib = max_after_warm.rss_kib.max(p.rss_kib);
                    max_after_warm.fds = max_after_warm.fds.max(p.fds);
                    total.add(&window).expect("same bounds");
                    txns_after_warm += d_txns;
                    errors_after_warm += d_errors;
                }
                _ => {
                    total.add(&window).expect("same bounds");
                    txns_after_warm += d_txns;
                    errors_after_warm += d_errors;
                }
            }
        }
        last = now;
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tasks.abort_all();
    }
    for m in shared.messages.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("soak error: {m}");
    }
    let l = Percentiles::of(&total);
    let mut verdict = Vec::new();
    let mut line = format!(
        "soak summary target={} after warm-up: txns={txns_after_warm} errors={errors_after_warm} p50={:.3}ms p99={:.3}ms p99.9={:.3}ms connects={}",
        target.name,
        l.p50,
        l.p99,
        l.p999,
        shared.counters.connects.load(Relaxed)
    );
    if let (Some(w), Some(end)) = (warm, last) {
        let growth = max_after_warm.rss_kib as f64 / w.rss_kib as f64 - 1.0;
        line += &format!(
            " rss_warm={:.1}MiB rss_max={:.1}MiB rss_end={:.1}MiB growth={:+.1}% fds_warm={} fds_max={} fds_end={}",
            w.rss_kib as f64 / 1024.0,
            max_after_warm.rss_kib as f64 / 1024.0,
            end.rss_kib as f64 / 1024.0,
            growth * 100.0,
            w.fds,
            max_after_warm.fds,
            end.fds
        );
        if growth > RSS_GROWTH_LIMIT {
            verdict.push(format!("RSS grew {:.1}% after warm-up", growth * 100.0));
        }
        // Descriptors follow the connected clients (replaced all the time),
        // so "no growth" allows the reconnect churn in flight.
        let churn = (clients as f64 * args.reconnect_rate * 2.0).ceil() as u64 + 8;
        if end.fds > w.fds + churn {
            verdict.push(format!("descriptors grew from {} to {}", w.fds, end.fds));
        }
    }
    if errors_after_warm > 0 {
        verdict.push(format!("{errors_after_warm} errors"));
    }
    println!("{line}");
    if !verdict.is_empty() {
        bail!("soak failed: {}", verdict.join("; "));
    }
    println!("soak passed: no error, RSS within 5% of its value after warm-up, descriptors flat");
    Ok(())
}

struct Client {
    id: usize,
    /// `Some(period)`: sends a transaction every period (`None` inside:
    /// closed loop); `None`: idle after one `SELECT 1`.
    pace: Option<Option<Duration>>,
    gen: Generator,
    rng: Rng,
    reconnect_rate: f64,
    connect_timeout: Duration,
    params: Arc<ConnParams>,
    shared: Arc<Shared>,
    sem: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
}

impl Client {
    async fn run(mut self) {
        let mut select1 = BytesMut::new();
        encode::query(&mut select1, b"SELECT 1");
        let rollback = workload::rollback();
        while !*self.stop.borrow() {
            let conn = {
                let Ok(_permit) = self.sem.acquire().await else { return };
                tokio::time::timeout(self.connect_timeout, reconnect(&self.params, &self.gen)).await
            };
            let mut conn = match conn {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    self.shared.error(format!("connect: {e:#}"));
                    tokio::time::sleep(RETRY_DELAY).await;
                    continue;
                }
                Err(_) => {
                    self.shared.error("connect: timed out".into());
                    continue;
                }
            };
            let c = &self.shared.counters;
            c.connects.fetch_add(1, Relaxed);
            c.connected.fetch_add(1, Relaxed);
            // Memoryless lifetimes: at any moment, reconnect_rate of the
            // connections are replaced per second.
            let life = if self.reconnect_rate > 0.0 {
                -(1.0 - self.rng.fraction()).ln() / self.reconnect_rate
            } else {
                f64::MAX
            };
            let until = Instant::now() + Duration::from_secs_f64(life.min(1e7));
            let mut healthy = true;
            match self.pace {
                None => match conn.exchange(&select1).await {
                    Ok(r) if !r.error => {
                        let mut stop = self.stop.clone();
                        tokio::select! {
                            _ = tokio::time::sleep_until(until.into()) => {}
                            _ = stop.wait_for(|s| *s) => {}
                        }
                    }
                    Ok(_) => self.shared.error(conn.last_error().to_owned()),
                    Err(e) => {
                        self.shared.error(format!("{e:#}"));
                        healthy = false;
                    }
                },
                Some(period) => {
                    let mut next = Instant::now() + period.unwrap_or_default().mul_f64(self.rng.fraction());
                    while Instant::now() < until && !*self.stop.borrow() {
                        let start = match period {
                            Some(p) => {
                                if next >= until {
                                    tokio::time::sleep_until(until.into()).await;
                                    break;
                                }
                                tokio::time::sleep_until(next.into()).await;
                                let at = next;
                                next += p;
                                at
                            }
                            None => Instant::now(),
                        };
                        match conn.exchange(self.gen.next_request()).await {
                            Ok(r) if !r.error => self.shared.success(self.id, start.elapsed()),
                            Ok(r) => {
                                self.shared.error(conn.last_error().to_owned());
                                if r.status != TxStatus::Idle && conn.exchange(&rollback).await.is_err() {
                                    healthy = false;
                                    break;
                                }
                            }
                            Err(e) => {
                                self.shared.error(format!("{e:#}"));
                                healthy = false;
                                break;
                            }
                        }
                    }
                }
            }
            c.connected.fetch_sub(1, Relaxed);
            if healthy {
                conn.terminate().await;
            }
        }
    }
}
