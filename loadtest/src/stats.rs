//! Recording (latency histograms, error counts) and reporting (result
//! lines, JSON, the per-target summary).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Phases of a round, shared by all clients.
pub const PHASE_WARMUP: u8 = 0;
pub const PHASE_MEASURE: u8 = 1;
pub const PHASE_STOP: u8 = 2;

/// Distinct error messages kept for printing.
const MAX_ERROR_MESSAGES: usize = 5;
/// Histogram shards: clients record into `shard[client % SHARDS]`, so two
/// runtime threads rarely meet on one lock and memory stays fixed however
/// many clients there are.
const SHARDS: usize = 16;

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What the clients of one (round, target) record into.
pub struct Recorder {
    phase: AtomicU8,
    shards: Vec<Mutex<Histogram<u64>>>,
    errors: AtomicU64,
    messages: Mutex<Vec<String>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            phase: AtomicU8::new(PHASE_WARMUP),
            shards: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
            errors: AtomicU64::new(0),
            messages: Mutex::new(Vec::new()),
        }
    }
}

impl Recorder {
    #[inline]
    pub fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }

    pub fn set_phase(&self, p: u8) {
        self.phase.store(p, Ordering::Relaxed);
    }

    /// Records a successful transaction if the measurement window is open.
    #[inline]
    pub fn success(&self, client: usize, latency: Duration) {
        if self.phase() == PHASE_MEASURE {
            let mut h = self.shards[client % SHARDS].lock().unwrap_or_else(|e| e.into_inner());
            h.saturating_record(latency.as_micros().max(1) as u64);
        }
    }

    /// Counts a failed transaction (in the window) and keeps its message if
    /// it is new.
    pub fn error(&self, message: &str) {
        if self.phase() == PHASE_MEASURE {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.note(message);
    }

    /// Keeps a message without counting it (e.g. a failed connect).
    pub fn note(&self, message: &str) {
        let mut m = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < MAX_ERROR_MESSAGES && !m.iter().any(|x| x == message) {
            m.push(message.to_owned());
        }
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All shards merged.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for s in &self.shards {
            all.add(&*s.lock().unwrap_or_else(|e| e.into_inner()))
                .expect("same bounds");
        }
        all
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            }
        };
        Percentiles {
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
            p999: ms(0.999),
        }
    }
}

/// One (round, target) measurement.
#[derive(Debug, Clone)]
pub struct RoundResult {
    pub round: usize,
    pub target: String,
    pub clients: usize,
    pub connected: usize,
    pub workload: &'static str,
    pub transactions: u64,
    pub seconds: f64,
    pub tps: f64,
    pub latency: Percentiles,
    pub errors: u64,
    /// Target process CPU time per transaction, µs.
    pub cpu_us_per_txn: Option<f64>,
    /// Target process RSS at the end of the window, KiB.
    pub rss_kib: Option<u64>,
    /// The generator's own CPU time per transaction, µs.
    pub gen_cpu_us_per_txn: Option<f64>,
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else if v >= 10.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.2}ms")
    }
}

impl RoundResult {
    pub fn line(&self) -> String {
        let l = &self.latency;
        let mut s = format!(
            "round={} target={} clients={} workload={} tps={:.1} p50={} p95={} p99={} p99.9={} errors={}",
            self.round,
            self.target,
            self.clients,
            self.workload,
            self.tps,
            ms(l.p50),
            ms(l.p95),
            ms(l.p99),
            ms(l.p999),
            self.errors
        );
        if self.connected != self.clients {
            let _ = write!(s, " connected={}", self.connected);
        }
        if let Some(c) = self.cpu_us_per_txn {
            let _ = write!(s, " cpu={c:.1}us/txn");
        }
        if let Some(r) = self.rss_kib {
            let _ = write!(s, " rss={:.1}MiB", r as f64 / 1024.0);
        }
        if let Some(c) = self.gen_cpu_us_per_txn {
            let _ = write!(s, " gen_cpu={c:.1}us/txn");
        }
        s
    }

    pub fn json(&self) -> String {
        let l = &self.latency;
        let opt = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.3}"));
        format!(
            concat!(
                "{{\"round\":{},\"target\":{},\"clients\":{},\"connected\":{},\"workload\":\"{}\",",
                "\"transactions\":{},\"seconds\":{:.3},\"tps\":{:.1},\"p50_ms\":{:.3},\"p95_ms\":{:.3},",
                "\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"errors\":{},\"cpu_us_per_txn\":{},\"rss_kib\":{},",
                "\"gen_cpu_us_per_txn\":{}}}"
            ),
            self.round,
            json_str(&self.target),
            self.clients,
            self.connected,
            self.workload,
            self.transactions,
            self.seconds,
            self.tps,
            l.p50,
            l.p95,
            l.p99,
            l.p999,
            self.errors,
            opt(self.cpu_us_per_txn),
            self.rss_kib.map_or("null".to_owned(), |v| v.to_string()),
            opt(self.gen_cpu_us_per_txn)
        )
    }
}

pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The per-target table printed after all rounds: medians across rounds and
/// each target's median TPS relative to the first target's.
pub fn summary(targets: &[String], results: &[RoundResult]) -> String {
    let mut out = String::new();
    let Some(first) = results.first() else {
        return out;
    };
    let _ = writeln!(
        out,
        "summary workload={} clients={} rounds={} (medians across rounds)",
        first.workload,
        first.clients,
        results.iter().map(|r| r.round).max().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>12} {:>9} {:>12} {:>8}",
        "target", "tps", "p50", "p95", "p99", "p99.9", "errors", "cpu_us/txn", "rss_MiB", "gen_us/txn", "ratio"
    );
    let mut base = None;
    for t in targets {
        let rs: Vec<&RoundResult> = results.iter().filter(|r| &r.target == t).collect();
        if rs.is_empty() {
            continue;
        }
        let med = |f: &dyn Fn(&RoundResult) -> f64| median(rs.iter().map(|r| f(r)).collect());
        let tps = med(&|r| r.tps);
        let base_tps = *base.get_or_insert(tps);
        let cpu: Vec<f64> = rs.iter().filter_map(|r| r.cpu_us_per_txn).collect();
        let gen_cpu: Vec<f64> = rs.iter().filter_map(|r| r.gen_cpu_us_per_txn).collect();
        let rss: Vec<f64> = rs.iter().filter_map(|r| r.rss_kib.map(|k| k as f64 / 1024.0)).collect();
        let opt = |v: Vec<f64>| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", median(v))
            }
        };
        let ratio = if base_tps > 0.0 {
            format!("{:.3}", tps / base_tps)
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            out,
            "{:<14} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>8} {:>12} {:>9} {:>12} {:>8}",
            t,
            tps,
            ms(med(&|r| r.latency.p50)),
            ms(med(&|r| r.latency.p95)),
            ms(med(&|r| r.latency.p99)),
            ms(med(&|r| r.latency.p999)),
            rs.iter().map(|r| r.errors).sum::<u64>(),
            opt(cpu),
            opt(rss),
            opt(gen_cpu),
            ratio
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn records_only_in_window() {
        let r = Recorder::default();
        r.success(0, Duration::from_micros(100));
        r.error("boom");
        r.set_phase(PHASE_MEASURE);
        r.success(1, Duration::from_micros(1200));
        r.success(17, Duration::from_micros(1200));
        r.error("boom");
        r.error("bang");
        let h = r.histogram();
        assert_eq!(h.len(), 2);
        assert_eq!(r.errors(), 2);
        assert_eq!(r.messages(), vec!["boom".to_owned(), "bang".to_owned()]);
        let p = Percentiles::of(&h);
        assert!((p.p50 - 1.2).abs() < 0.01);
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
