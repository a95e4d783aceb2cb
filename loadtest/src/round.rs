//! One (round, target) run: connect the clients, warm up, measure, disconnect.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use pgferry_protocol::backend::TxStatus;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cli::WorkloadKind;
use crate::conn::{Conn, ConnParams};
use crate::procfs;
use crate::stats::{Percentiles, Recorder, RoundResult, PHASE_MEASURE, PHASE_STOP};
use crate::workload::{self, Generator, Scale};

/// How long clients may take to finish their last transaction and close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause before a client replaces a broken connection.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// The settings shared by every round.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kind: WorkloadKind,
    pub scale: Scale,
    pub clients: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub think: Duration,
    /// Transactions per second per client, open loop; 0 = closed loop.
    pub rate: f64,
    pub connect_concurrency: usize,
}

/// When a client sends its transactions.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As soon as the previous one ended, plus a pause.
    Closed(Duration),
    /// Every `period`, from a random phase; latency counts from the
    /// scheduled start.
    Open { period: Duration },
}

impl Pace {
    pub fn new(think: Duration, rate: f64) -> Pace {
        if rate > 0.0 {
            Pace::Open {
                period: Duration::from_secs_f64(1.0 / rate),
            }
        } else {
            Pace::Closed(think)
        }
    }
}

/// Opens `n` connections, at most `concurrency` handshakes at a time, and
/// runs `setup` (if any) on each. Failures are noted in `recorder`; the
/// connections that made it are returned, also those whose setup failed.
pub async fn connect_all(
    params: &Arc<ConnParams>,
    n: usize,
    concurrency: usize,
    setup: Option<Vec<u8>>,
    recorder: &Recorder,
) -> Vec<Conn> {
    let sem = Arc::new(Semaphore::new(concurrency));
    let setup: Option<Arc<[u8]>> = setup.map(Into::into);
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (sem, params, setup) = (sem.clone(), params.clone(), setup.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut c = Conn::connect(&params).await?;
            let mut setup_error = None;
            if let Some(s) = setup {
                if c.exchange(&s).await?.error {
                    setup_error = Some(format!("connection setup: {}", c.last_error()));
                }
            }
            Ok::<_, anyhow::Error>((c, setup_error))
        });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((c, setup_error))) => {
                // A failed setup (e.g. a pooler that cannot keep a prepared
                // statement) is the target's behaviour under test: keep the
                // client, its transactions will show the errors.
                if let Some(e) = setup_error {
                    recorder.note(&e);
                }
                conns.push(c)
            }
            Ok(Err(e)) => recorder.note(&format!("connect: {e:#}")),
            Err(e) => recorder.note(&format!("connect task: {e}")),
        }
    }
    conns
}

pub fn seed(round: usize, client: usize) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ ((round as u64) << 48) ^ client as u64
}

/// Runs one round against one target. Fails only when no client could connect.
pub async fn run(
    round: usize,
    target: &str,
    params: &Arc<ConnParams>,
    settings: &Settings,
    pid: Option<u32>,
) -> Result<(RoundResult, Vec<String>)> {
    let recorder = Arc::new(Recorder::default());
    let mut tasks = JoinSet::new();
    let connected;
    if settings.kind == WorkloadKind::Connect {
        connected = settings.clients;
        for i in 0..settings.clients {
            let (params, recorder) = (params.clone(), recorder.clone());
            let gen = Generator::new(settings.kind, settings.scale, seed(round, i));
            tasks.spawn(connect_client(i, gen, params, recorder, settings.think));
        }
    } else {
        let setup = Generator::new(settings.kind, settings.scale, 0).connection_setup();
        let conns = connect_all(params, settings.clients, settings.connect_concurrency, setup, &recorder).await;
        connected = conns.len();
        if connected == 0 {
            bail!("no client could connect: {}", recorder.messages().join("; "));
        }
        for (i, conn) in conns.into_iter().enumerate() {
            let (params, recorder) = (params.clone(), recorder.clone());
            let gen = Generator::new(settings.kind, settings.scale, seed(round, i));
            let pace = Pace::new(settings.think, settings.rate);
            tasks.spawn(client(i, conn, gen, params, recorder, pace));
        }
    }

    tokio::time::sleep(settings.warmup).await;
    let me = std::process::id();
    let gen_cpu0 = procfs::cpu_micros(me).ok();
    let cpu0 = pid.and_then(|p| procfs::cpu_micros(p).ok());
    let t0 = Instant::now();
    recorder.set_phase(PHASE_MEASURE);
    tokio::time::sleep(settings.duration).await;
    recorder.set_phase(PHASE_STOP);
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = pid.and_then(|p| procfs::cpu_micros(p).ok());
    let gen_cpu1 = procfs::cpu_micros(me).ok();
    let rss_kib = pid.and_then(|p| procfs::rss_kib(p).ok());

    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
        recorder.note(&format!(
            "{} clients still busy {DRAIN_TIMEOUT:?} after the window; aborted",
            tasks.len()
        ));
    }

    let hist = recorder.histogram();
    let transactions = hist.len();
    let per_txn = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if transactions > 0 => Some(b.saturating_sub(a) as f64 / transactions as f64),
        _ => None,
    };
    let result = RoundResult {
        round,
        target: target.to_owned(),
        clients: settings.clients,
        connected,
        workload: settings.kind.name(),
        transactions,
        seconds,
        tps: transactions as f64 / seconds,
        latency: Percentiles::of(&hist),
        errors: recorder.errors(),
        cpu_us_per_txn: per_txn(cpu0, cpu1),
        rss_kib,
        gen_cpu_us_per_txn: per_txn(gen_cpu0, gen_cpu1),
    };
    Ok((result, recorder.messages()))
}

/// A client on one long-lived connection (reconnecting if it breaks).
async fn client(
    id: usize,
    conn: Conn,
    mut gen: Generator,
    params: Arc<ConnParams>,
    recorder: Arc<Recorder>,
    pace: Pace,
) {
    let rollback = workload::rollback();
    let mut conn = Some(conn);
    let mut next = match pace {
        Pace::Open { period } => Instant::now() + period.mul_f64(gen.fraction()),
        Pace::Closed(_) => Instant::now(),
    };
    while recorder.phase() != PHASE_STOP {
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(RECONNECT_DELAY).await;
            match reconnect(&params, &gen).await {
                Ok(c) => conn = Some(c),
                Err(e) => recorder.error(&format!("reconnect: {e:#}")),
            }
            continue;
        };
        let start = match pace {
            Pace::Open { period } => {
                tokio::time::sleep_until(next.into()).await;
                let at = next;
                next += period;
                at
            }
            Pace::Closed(_) => Instant::now(),
        };
        let request = gen.next_request();
        match c.exchange(request).await {
            Ok(reply) if !reply.error => recorder.success(id, start.elapsed()),
            Ok(reply) => {
                recorder.error(c.last_error());
                if reply.status != TxStatus::Idle && c.exchange(&rollback).await.is_err() {
                    conn = None;
                }
            }
            Err(e) => {
                recorder.error(&format!("{e:#}"));
                conn = None;
            }
        }
        if let Pace::Closed(think) = pace {
            if !think.is_zero() {
                tokio::time::sleep(think).await;
            }
        }
    }
    if let Some(c) = conn {
        c.terminate().await;
    }
}

pub async fn reconnect(params: &ConnParams, gen: &Generator) -> Result<Conn> {
    let mut c = Conn::connect(params).await?;
    if let Some(s) = gen.connection_setup() {
        c.exchange(&s).await?;
    }
    Ok(c)
}

/// A client of the connect workload: every transaction is connect,
/// authenticate, `SELECT 1`, Terminate.
async fn connect_client(
    id: usize,
    mut gen: Generator,
    params: Arc<ConnParams>,
    recorder: Arc<Recorder>,
    think: Duration,
) {
    while recorder.phase() != PHASE_STOP {
        let start = Instant::now();
        match Conn::connect(&params).await {
            Ok(mut c) => match c.exchange(gen.next_request()).await {
                Ok(reply) if !reply.error => {
                    c.terminate().await;
                    recorder.success(id, start.elapsed());
                }
                Ok(_) => {
                    recorder.error(c.last_error());
                    c.terminate().await;
                }
                Err(e) => recorder.error(&format!("{e:#}")),
            },
            Err(e) => {
                recorder.error(&format!("connect: {e:#}"));
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
        if !think.is_zero() {
            tokio::time::sleep(think).await;
        }
    }
}
