//! Replica lag from Patroni's keys, measured so that it does not depend on
//! when each key happened to be written, and the read set's hysteresis.
//!
//! Every Patroni writes its own position on its own schedule, once per
//! `loop_wait` at most (patroni-etcd.md, sections 2 and 3): comparing the
//! leader's latest position with a replica's latest one compares moments up
//! to a loop apart, so any WAL rate above max_replica_lag / loop_wait made
//! every replica look lagging (issue 13, item 4). Instead each position is
//! stamped with when it arrived, and a replica's position is compared with
//! the leader's position *at that moment* (interpolated between the
//! leader's samples). Sans-IO: callers pass the time.

use crate::patroni::Group;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Margin over `loop_wait` for a Patroni loop's own duration and for etcd's
/// delivery: a member key not rewritten for `loop_wait + SLACK` is known to
/// have kept its position through the member's last loop.
pub const SLACK: Duration = Duration::from_secs(1);
/// Patroni's default `loop_wait`, until its `config` key is read.
pub const DEFAULT_LOOP_WAIT: Duration = Duration::from_secs(10);
/// Leader samples kept: enough to bracket any replica sample still in use
/// (one loop old at most, see [`estimate`]), and to say how long ago the
/// leader passed a replica's position over a minute or more (at most one
/// sample per loop while WAL moves; older than that, the lag in time shown
/// is a lower bound).
const HISTORY: usize = 64;

/// A WAL position and when pgferry saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at: Instant,
    pub pos: u64,
}

/// The leader's WAL position over time (`status` optime and the leader's
/// member key, which it writes every loop while WAL moves).
#[derive(Debug, Default, Clone)]
pub struct LeaderHistory {
    samples: VecDeque<Sample>,
}

impl LeaderHistory {
    /// Records the leader's position as seen at `s.at` (a repeat of the
    /// last position is not a new sample: only a change says when).
    pub fn record(&mut self, s: Sample, loop_wait: Duration) {
        let Some(last) = self.samples.back().copied() else {
            self.samples.push_back(s);
            return;
        };
        if last.pos == s.pos || s.at < last.at {
            return;
        }
        // The leader rewrites `status` every loop even when nothing moved,
        // and those rewrites are not changes: after a quiet spell the old
        // position still held one loop before this one. Without this point
        // a burst after an idle minute would be spread over the minute.
        if let Some(quiet_until) = s.at.checked_sub(loop_wait) {
            if quiet_until > last.at {
                self.samples.push_back(Sample {
                    at: quiet_until,
                    pos: last.pos,
                });
            }
        }
        self.samples.push_back(s);
        while self.samples.len() > HISTORY {
            self.samples.pop_front();
        }
    }

    /// Best estimate of the leader's position at `t`: interpolated between
    /// the samples around it; the first or last sample outside them.
    pub fn at(&self, t: Instant) -> Option<u64> {
        let first = self.samples.front()?;
        if t <= first.at {
            return Some(first.pos);
        }
        for w in self.samples.iter().collect::<Vec<_>>().windows(2) {
            let (a, b) = (w[0], w[1]);
            if t <= b.at {
                let span = b.at.duration_since(a.at).as_secs_f64();
                let part = t.duration_since(a.at).as_secs_f64();
                let frac = if span > 0.0 { part / span } else { 1.0 };
                let pos = a.pos as f64 + (b.pos as f64 - a.pos as f64) * frac;
                return Some(pos.round() as u64);
            }
        }
        self.samples.back().map(|s| s.pos)
    }

    /// A lower bound of the leader's position at `t`: the last position it
    /// had reached by then. None when there is no sample that early.
    pub fn reached_by(&self, t: Instant) -> Option<u64> {
        self.samples.iter().rev().find(|s| s.at <= t).map(|s| s.pos)
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// When the leader first went past `pos`, interpolated between its
    /// samples (the earliest sample if it was already past then: the lag
    /// seen is a lower bound). None: not past it, as far as pgferry saw.
    pub fn passed_at(&self, pos: u64) -> Option<Instant> {
        let mut before: Option<Sample> = None;
        for s in &self.samples {
            if s.pos > pos {
                return Some(match before {
                    Some(a) if s.pos > a.pos && s.at > a.at => {
                        let frac = (pos - a.pos) as f64 / (s.pos - a.pos) as f64;
                        a.at + s.at.duration_since(a.at).mul_f64(frac)
                    }
                    _ => s.at,
                });
            }
            before = Some(*s);
        }
        None
    }
}

/// Bytes a replica is behind the leader, from its last position change
/// `replica`, at `now`. None while the leader's position is unknown.
///
/// Patroni rewrites a member key only when its content changes: a key
/// older than a loop still held its position at the member's last loop,
/// so the comparison moves forward with time (a stuck replica's lag grows).
///
/// A synchronous standby is compared with the leader's position known to
/// have been reached before its own sample (a lower bound): it has flushed
/// every commit the leader acknowledged, so only a gap that key timing
/// cannot explain counts.
pub fn estimate(leader: &LeaderHistory, replica: Sample, now: Instant, loop_wait: Duration, sync: bool) -> Option<u64> {
    if leader.is_empty() {
        return None;
    }
    let vouched = now.checked_sub(loop_wait + SLACK).unwrap_or(replica.at);
    let t = replica.at.max(vouched);
    let leader_pos = if sync {
        leader.reached_by(t).unwrap_or(replica.pos)
    } else {
        leader.at(t)?
    };
    Some(leader_pos.saturating_sub(replica.pos))
}

/// How long a replica is behind, in time: from when the leader first went
/// past the replica's position to the moment [`estimate`] compares at.
/// Zero when the leader had not gone past it; None while the leader's
/// position is unknown. This is what "10 s behind" means to an operator:
/// the replica shows the database as it was that long ago.
pub fn estimate_seconds(
    leader: &LeaderHistory,
    replica: Sample,
    now: Instant,
    loop_wait: Duration,
) -> Option<Duration> {
    if leader.is_empty() {
        return None;
    }
    let vouched = now.checked_sub(loop_wait + SLACK).unwrap_or(replica.at);
    let t = replica.at.max(vouched);
    Some(match leader.passed_at(replica.pos) {
        Some(p) if p < t => t.duration_since(p),
        _ => Duration::ZERO,
    })
}

/// The read set's hysteresis marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// Above this (max_replica_lag) for `hold`, a replica leaves.
    pub high: u64,
    /// At or below this, a replica (re)joins.
    pub low: u64,
    pub hold: Duration,
}

impl Marks {
    /// Leave after staying above max_replica_lag for a loop and a margin
    /// (so one skewed reading never evicts: the member's next key, due
    /// within a loop, corrects it); come back at half of it.
    pub fn new(max_lag: u64, loop_wait: Duration) -> Marks {
        Marks {
            high: max_lag,
            low: max_lag / 2,
            hold: loop_wait + SLACK,
        }
    }
}

/// Whether one replica is in the read set.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    serving: bool,
    above_since: Option<Instant>,
}

impl Gate {
    /// Takes a lag reading (None: unknown, which counts as too far behind)
    /// and says whether the replica serves reads now.
    pub fn update(&mut self, lag: Option<u64>, now: Instant, m: &Marks) -> bool {
        match lag {
            Some(l) if !self.serving => {
                if l <= m.low {
                    self.serving = true;
                    self.above_since = None;
                }
            }
            Some(l) if l <= m.high => self.above_since = None,
            _ if !self.serving => {}
            _ => {
                let since = *self.above_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= m.hold {
                    self.serving = false;
                    self.above_since = None;
                }
            }
        }
        self.serving
    }
}

/// What the tracker decided for one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    pub lag: Option<u64>,
    /// The same in time (see [`estimate_seconds`]).
    pub lag_time: Option<Duration>,
    pub serving: bool,
}

#[derive(Debug, Clone)]
struct Replica {
    last: Sample,
    gate: Gate,
}

/// Lag and read-set membership for one Patroni group, across watch
/// restarts (it keeps its own history; the key view is rebuilt on resync).
#[derive(Debug, Default)]
pub struct LagTracker {
    leader: LeaderHistory,
    replicas: BTreeMap<String, Replica>,
}

impl LagTracker {
    /// Takes the group's current positions (new ones stamped `now`) and
    /// decides each serving replica's lag and read-set membership. Members
    /// that are not replicas able to serve (the leader, stopped, tagged
    /// noloadbalance) are forgotten: they rejoin through the low mark.
    pub fn update(&mut self, g: &Group, max_lag: u64, now: Instant) -> BTreeMap<String, Assessment> {
        let loop_wait = g.loop_wait.map_or(DEFAULT_LOOP_WAIT, Duration::from_secs);
        if let Some(pos) = g.leader_wal() {
            self.leader.record(Sample { at: now, pos }, loop_wait);
        }
        let marks = Marks::new(max_lag, loop_wait);
        let mut out = BTreeMap::new();
        self.replicas
            .retain(|name, _| g.members.get(name).is_some_and(|m| g.is_replica(m)));
        for m in g.members.values().filter(|m| g.is_replica(m)) {
            let Some(pos) = m.xlog_location else {
                self.replicas.remove(&m.name);
                out.insert(
                    m.name.clone(),
                    Assessment {
                        lag: None,
                        lag_time: None,
                        serving: false,
                    },
                );
                continue;
            };
            let r = self.replicas.entry(m.name.clone()).or_insert_with(|| Replica {
                last: Sample { at: now, pos },
                gate: Gate::default(),
            });
            if r.last.pos != pos {
                r.last = Sample { at: now, pos };
            }
            let sync = g.sync_standbys.contains(&m.name);
            let lag = estimate(&self.leader, r.last, now, loop_wait, sync);
            let serving = r.gate.update(lag, now, &marks);
            let lag_time = estimate_seconds(&self.leader, r.last, now, loop_wait);
            out.insert(m.name.clone(), Assessment { lag, lag_time, serving });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_in_time_is_how_long_ago_the_leader_passed_the_replica() {
        let t0 = Instant::now();
        // 10 MB/s, samples every 2 s.
        let h = busy_leader(t0, 60_000);
        // A replica at 100 MB (the leader passed it at 10 s), seen at 60 s.
        let stuck = s(t0, 20_000, 100 * MB);
        let now = t0 + Duration::from_secs(60);
        let lag = estimate_seconds(&h, stuck, now, LOOP).unwrap();
        // Compared at now - (loop_wait + SLACK) = 57 s: 47 s behind.
        assert_eq!(lag.as_millis(), 47_000);
        // Between samples: at 105 MB the leader passed at 10.5 s.
        let mid = s(t0, 59_000, 105 * MB);
        assert_eq!(estimate_seconds(&h, mid, now, LOOP).unwrap().as_millis(), 48_500);
        // Caught up, or ahead of what pgferry has seen: zero.
        let current = s(t0, 60_000, 600 * MB);
        assert_eq!(estimate_seconds(&h, current, now, LOOP), Some(Duration::ZERO));
        let ahead = s(t0, 60_000, 700 * MB);
        assert_eq!(estimate_seconds(&h, ahead, now, LOOP), Some(Duration::ZERO));
        // A position written between the leader's samples is not behind.
        let fresh = s(t0, 59_500, 595 * MB);
        assert_eq!(estimate_seconds(&h, fresh, now, LOOP), Some(Duration::ZERO));
        // Unknown leader: unknown.
        assert_eq!(estimate_seconds(&LeaderHistory::default(), stuck, now, LOOP), None);
    }

    const MB: u64 = 1 << 20;
    const LOOP: Duration = Duration::from_secs(2);

    fn s(t0: Instant, ms: u64, pos: u64) -> Sample {
        Sample {
            at: t0 + Duration::from_millis(ms),
            pos,
        }
    }

    /// The leader writing 10 MB/s, publishing every 2 s at phase 0.
    fn busy_leader(t0: Instant, until_ms: u64) -> LeaderHistory {
        let mut h = LeaderHistory::default();
        for ms in (0..=until_ms).step_by(2000) {
            h.record(s(t0, ms, 10 * MB * ms / 1000), LOOP);
        }
        h
    }

    #[test]
    fn a_replica_written_between_leader_keys_is_not_lagging() {
        let t0 = Instant::now();
        let leader = busy_leader(t0, 6000);
        // The replica publishes at phase 500 ms, right behind the leader
        // (64 kB): the old computation said 6000 ms - 4500 ms = 15 MB.
        let replica = s(t0, 4500, 45 * MB - 65536);
        let now = t0 + Duration::from_millis(6000);
        let naive = 60 * MB - replica.pos;
        assert!(naive > 14 * MB, "the skew the old computation saw: {naive}");
        let lag = estimate(&leader, replica, now, LOOP, false).unwrap();
        assert_eq!(lag, 65536);
        // Same for a synchronous standby: the leader's position reached by
        // 4500 ms was 40 MB, so nothing counts against it.
        assert_eq!(estimate(&leader, replica, now, LOOP, true), Some(0));
    }

    #[test]
    fn a_stuck_replica_lags_more_as_time_goes_on() {
        let t0 = Instant::now();
        let leader = busy_leader(t0, 10000);
        // Last position change at 1000 ms (10 MB), never rewritten since:
        // Patroni rewrites only on change, so it still had 10 MB at its loop
        // one loop_wait (+ slack) before now.
        let replica = s(t0, 1000, 10 * MB);
        let now = t0 + Duration::from_millis(10000);
        let lag = estimate(&leader, replica, now, LOOP, false).unwrap();
        assert_eq!(lag, 70 * MB - 10 * MB, "compared with the leader at 7 s");
        // The synchronous standby is not exempt from real lag.
        let sync = estimate(&leader, replica, now, LOOP, true).unwrap();
        assert_eq!(sync, 50 * MB, "the leader had reached 60 MB by 6 s");
    }

    #[test]
    fn a_burst_after_a_quiet_spell_is_not_spread_over_it() {
        let t0 = Instant::now();
        let mut leader = LeaderHistory::default();
        leader.record(s(t0, 0, 100), LOOP);
        // Idle for a minute (status rewritten, unchanged), then 20 MB.
        leader.record(s(t0, 60_000, 100 + 20 * MB), LOOP);
        assert_eq!(leader.at(t0 + Duration::from_millis(57_000)), Some(100));
        // A caught-up idle replica, seen at 0, evaluated as the burst lands.
        let lag = estimate(&leader, s(t0, 0, 100), t0 + Duration::from_millis(60_000), LOOP, false);
        assert_eq!(lag, Some(0));
    }

    #[test]
    fn unknown_without_a_leader_position() {
        let t0 = Instant::now();
        assert_eq!(estimate(&LeaderHistory::default(), s(t0, 0, 1), t0, LOOP, false), None);
    }

    #[test]
    fn hysteresis_holds_and_comes_back_below_the_low_mark() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let m = Marks::new(16 * MB, LOOP);
        assert_eq!((m.low, m.hold), (8 * MB, Duration::from_secs(3)));
        let mut g = Gate::default();
        // Joins only at or below the low mark.
        assert!(!g.update(Some(10 * MB), at(0), &m));
        assert!(g.update(Some(8 * MB), at(100), &m));
        // One reading above the high mark does not evict...
        assert!(g.update(Some(20 * MB), at(1000), &m));
        assert!(g.update(Some(20 * MB), at(3900), &m));
        // ...and a reading back under it resets the clock.
        assert!(g.update(Some(12 * MB), at(4000), &m));
        assert!(g.update(Some(20 * MB), at(5000), &m));
        assert!(g.update(None, at(7000), &m), "unknown counts as above, same clock");
        assert!(!g.update(Some(20 * MB), at(8000), &m), "above for the whole hold: out");
        // Between the marks it stays out; at the low mark it is back.
        assert!(!g.update(Some(12 * MB), at(9000), &m));
        assert!(g.update(Some(MB), at(10000), &m));
    }

    #[test]
    fn tracker_keeps_replicas_under_a_sustained_wal_rate() {
        // 10 MB/s with the default max_replica_lag (16 MB) and loop_wait 2:
        // each member publishes at its own phase. The old computation
        // evicted both replicas; the synchronous one among them.
        use crate::patroni::PatroniState;
        let t0 = Instant::now();
        let mut st = PatroniState::new("/service/", "x", false);
        let member = |role: &str, port: u16, pos: u64| {
            format!(
                r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","state":"running","role":"{role}","xlog_location":{pos}}}"#
            )
        };
        st.apply("/service/x/config", Some(br#"{"ttl":10,"loop_wait":2}"#));
        st.apply("/service/x/leader", Some(b"pg1"));
        st.apply("/service/x/sync", Some(br#"{"leader":"pg1","sync_standby":"pg2"}"#));
        let mut tracker = LagTracker::default();
        let rate = 10 * MB; // per second
        let pos = |ms: u64| rate * ms / 1000;
        let mut evaluations = 0;
        for ms in (0..30_000u64).step_by(100) {
            // The leader at phase 0, pg2 at 100 ms (the worst case for the
            // old computation), pg3 at 1100 ms, replicas 20 ms of WAL behind.
            match ms % 2000 {
                0 => {
                    st.apply("/service/x/members/pg1", Some(member("master", 1, pos(ms)).as_bytes()));
                    st.apply(
                        "/service/x/status",
                        Some(format!(r#"{{"optime":{}}}"#, pos(ms)).as_bytes()),
                    );
                }
                100 => {
                    st.apply(
                        "/service/x/members/pg2",
                        Some(member("replica", 2, pos(ms - 20)).as_bytes()),
                    );
                }
                1100 => {
                    st.apply(
                        "/service/x/members/pg3",
                        Some(member("replica", 3, pos(ms - 20)).as_bytes()),
                    );
                }
                _ => {}
            }
            let g = st.coordinator().unwrap();
            let out = tracker.update(g, 16 * MB, t0 + Duration::from_millis(ms));
            if ms >= 1100 {
                evaluations += 1;
                for name in ["pg2", "pg3"] {
                    let a = out[name];
                    assert!(a.serving, "{name} left the read set at {ms} ms: {a:?}");
                    assert!(a.lag.unwrap() < MB, "{name} at {ms} ms: {a:?}");
                }
                // The naive difference the old code used.
                let naive = g
                    .leader_wal()
                    .unwrap()
                    .saturating_sub(g.members["pg2"].xlog_location.unwrap());
                if ms % 2000 == 0 {
                    assert!(naive > 16 * MB, "the test must reproduce the skew: {naive}");
                }
            }
        }
        assert!(evaluations > 200);
    }

    #[test]
    fn tracker_evicts_a_replica_that_stops_moving() {
        use crate::patroni::PatroniState;
        let t0 = Instant::now();
        let mut st = PatroniState::new("/service/", "x", false);
        st.apply("/service/x/config", Some(br#"{"ttl":10,"loop_wait":2}"#));
        st.apply("/service/x/leader", Some(b"pg1"));
        let leader = |pos: u64| {
            format!(r#"{{"conn_url":"postgres://h:1/p","state":"running","role":"master","xlog_location":{pos}}}"#)
        };
        st.apply("/service/x/members/pg1", Some(leader(0).as_bytes()));
        st.apply(
            "/service/x/members/pg2",
            Some(br#"{"conn_url":"postgres://h:2/p","state":"running","role":"replica","xlog_location":0}"#),
        );
        let mut tracker = LagTracker::default();
        let mut out_at = None;
        for ms in (0..20_000u64).step_by(100) {
            if ms % 2000 == 0 {
                st.apply("/service/x/members/pg1", Some(leader(MB * ms / 1000).as_bytes()));
            }
            let out = tracker.update(st.coordinator().unwrap(), 4 * MB, t0 + Duration::from_millis(ms));
            if !out["pg2"].serving && out_at.is_none() {
                out_at = Some(ms);
            }
        }
        // 1 MB/s: the estimate passes 4 MB once the replica's key is vouched
        // for at 4+ s (about 7 s), then the hold (3 s).
        let out_at = out_at.expect("a replica that stopped was never evicted");
        assert!((8000..=12_000).contains(&out_at), "evicted at {out_at} ms");
    }
}
