//! Binding a server connection before a request: the fast path, PAUSE,
//! following the topology, holding while the server is unreachable, and
//! bringing the connection's settings in line with the client's.

use super::*;
use pgferry_pool::stats::Total;
use pgferry_pool::{Queued, Room};

/// How a server connection gets bound for the next request.
pub(super) enum Bind {
    /// An idle connection in sync with the client: attach it.
    Now(PooledConn),
    /// No idle connection to take at once (all in use, or one to open, or
    /// shared limits to ask): wait in the pool's queue
    /// ([`Session::bind_queued`]).
    Queue,
    /// PAUSE, a topology change, a replayed BEGIN, or a connection whose
    /// settings need syncing: [`Session::bind_server_slow`].
    Slow(Start),
}

/// What the slow path starts from.
pub(super) enum Start {
    Nothing,
    /// Checked out; needs its settings synced.
    Conn(PooledConn),
    /// Room in the pool but no connection to hand over: open one.
    Room(Room),
}

impl Session {
    /// Binds a server connection before a request is forwarded, the common
    /// cases: no PAUSE, no topology change, and an idle connection whose
    /// session parameters match the client's, or none idle (wait in the
    /// queue). No await, so the slow path ([`bind_server_slow`], boxed by
    /// the caller) does not enlarge every client's future.
    pub(super) fn bind_now(&mut self) -> Bind {
        if self.shared.lifecycle.any_paused.load(Relaxed)
            || self.route_stale()
            || self.rebalance_due()
            || self.pending_begin.is_some()
        {
            return Bind::Slow(Start::Nothing);
        }
        let Some(mut conn) = self.pool.try_checkout() else {
            return Bind::Queue;
        };
        if !self.in_sync(&mut conn) {
            return Bind::Slow(Start::Conn(conn));
        }
        Bind::Now(conn)
    }

    /// Whether `conn`'s session parameters are the client's (no sync).
    fn in_sync(&mut self, conn: &mut PooledConn) -> bool {
        self.params.fingerprint() == params::server_fingerprint(conn)
    }

    /// Waits in the pool's queue for a connection another client gives
    /// back: the common wait of a busy pool, awaited in place (the queue's
    /// future is a few words, nothing is allocated). Anything unusual (a
    /// connection to open or to sync, the pool closed) goes on the slow
    /// path; the wait's own timeout (query_wait_timeout) is the client's
    /// error.
    pub(super) async fn bind_queued(&mut self) -> Result<(), PoolError> {
        let asked = self.now();
        self.client.entry.set_waiting_since(asked);
        let got = self.pool.queue().await;
        self.client.entry.set_waiting(false);
        // Time passed while waiting: a fresh reading.
        self.clock = None;
        let start = match got {
            Ok(Queued::Conn(mut conn)) => {
                if self.in_sync(&mut conn) {
                    self.attach(conn, Some(asked));
                    return Ok(());
                }
                Start::Conn(conn)
            }
            Ok(Queued::Room(room)) => Start::Room(room),
            // Replaced (RELOAD, RECONNECT, a failover) while the client
            // waited: the slow path routes again.
            Err(PoolError::ShuttingDown) => Start::Nothing,
            Err(e) => return Err(e),
        };
        Box::pin(self.bind_server_slow(start, asked)).await
    }

    /// The topology changed since this session last routed, or its pool was
    /// replaced: route again before the next transaction.
    pub(super) fn route_stale(&self) -> bool {
        self.route_gen != self.shared.router.generation() || self.pool.is_closed()
    }

    /// A read session's member has clearly more read sessions than another
    /// eligible replica (sessions ended, a replica came back): route again.
    /// Checked at most once per REBALANCE_EVERY, against the start of the
    /// previous transaction (no clock read on the fast path).
    fn rebalance_due(&mut self) -> bool {
        if !self.pool.key.read_only || self.bound_at < self.rebalance_at {
            return false;
        }
        self.rebalance_at = self.bound_at + REBALANCE_EVERY;
        self.rebalance = self.shared.router.overloaded(&self.route.member);
        self.rebalance
    }

    /// Makes `conn` the session's server connection. `asked` is when the
    /// client started waiting for it; None when it did not wait (the fast
    /// path: one clock read, a zero wait recorded).
    pub(super) fn attach(&mut self, conn: PooledConn, asked: Option<Instant>) {
        self.bound_at = self.now();
        self.client.entry.set_target(conn.id, self.bound_at, || CancelTarget {
            addr: conn.addr.clone(),
            pid: conn.backend_pid,
            key: conn.backend_key,
            server: conn.id,
            server_created: conn.created,
        });
        self.server = Some(conn);
        self.server_unflushed = false;
        let waited = asked.map_or(Duration::ZERO, |a| self.bound_at.saturating_duration_since(a));
        self.pool.stats.add(Total::WaitTime, waited.as_micros() as u64);
        self.pool.latency.record(LatencyKind::Wait, waited);
    }

    /// Binds a server connection the slow way: waits out a PAUSE, follows
    /// the topology, waits for a connection (or holds while the server is
    /// unreachable), and brings the connection's settings in line with the
    /// client's. `start`: what the caller already holds; `asked`: when the
    /// client began to wait.
    pub(super) async fn bind_server_slow(&mut self, start: Start, asked: Instant) -> Result<(), PoolError> {
        // One hold for the whole bind, however many retries it takes.
        let hold = self.shared.settings.failover_hold();
        let mut hold_until = asked + hold;
        let mut given = start;
        let mut retries = 0;
        loop {
            let mut conn = match std::mem::replace(&mut given, Start::Nothing) {
                Start::Conn(c) => c,
                // Opening the room is the hold's first attempt: a server
                // that cannot be reached is held from here, not tried again
                // at once.
                Start::Room(room) => self.checkout_or_hold(Some(room), asked, hold_until).await?,
                Start::Nothing => {
                    if self.shared.lifecycle.any_paused.load(Relaxed) {
                        self.wait_unpaused().await?;
                        // A PAUSE is the operator's, not a failover: the
                        // hold starts after it.
                        hold_until = Instant::now() + hold;
                    }
                    if self.route_stale() || self.rebalance {
                        self.reroute().await?;
                    }
                    // The fast path found no idle connection (or the pool has
                    // just changed): checkout takes an idle one first anyway.
                    self.checkout_or_hold(None, asked, hold_until).await?
                }
            };
            if !self.in_sync(&mut conn) {
                match self.sync_server(&mut conn).await {
                    Ok(()) => {}
                    // The server went away (a crash, a demotion) before any
                    // byte of the client's was sent: hold and retry like a
                    // failed checkout, never an error for the client.
                    // At least a few times: an idle connection can die
                    // without a failover (static topology holds nothing).
                    Err(e) if server_gone(&e) && (retries < 3 || Instant::now() < hold_until) => {
                        retries += 1;
                        tracing::info!(client = self.id, server = conn.id, error = %e, "server connection failed before the client's request; retrying");
                        drop(conn);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.pending_begin.is_some() {
                match self.replay_begin(&mut conn).await {
                    Ok(()) => {}
                    Err(e) if server_gone(&e) && (retries < 3 || Instant::now() < hold_until) => {
                        retries += 1;
                        drop(conn);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            // Time passed while waiting: a fresh reading.
            self.clock = None;
            self.attach(conn, Some(asked));
            return Ok(());
        }
    }

    /// PAUSE: new transactions wait (bounded like any wait for a server)
    /// until RESUME.
    pub(super) async fn wait_unpaused(&self) -> Result<(), PoolError> {
        let paused = self.shared.lifecycle.wait_unpaused(&self.pool.key.database);
        let wait = self.pool.settings.query_wait_timeout;
        if wait.is_zero() {
            paused.await;
        } else if tokio::time::timeout(wait, paused).await.is_err() {
            return Err(PoolError::WaitTimeout);
        }
        Ok(())
    }

    /// Checks a connection out; when the server cannot be reached (it just
    /// crashed, or is restarting in place), holds the transaction, retrying
    /// and following topology changes, for up to failover_hold_timeout: a
    /// client between transactions sees a pause, not an error, while etcd
    /// catches up with a dead leader. `deadline`: when the hold that the
    /// transaction's first attempt started ends (a retry after a server
    /// lost during the sync does not start a new one). `room`: room the
    /// queue already gave, opened first. The client shows as waiting since
    /// `asked` (SHOW CLIENTS, maxwait) until it has the connection.
    async fn checkout_or_hold(
        &mut self,
        room: Option<Room>,
        asked: Instant,
        deadline: Instant,
    ) -> Result<PooledConn, PoolError> {
        self.client.entry.set_waiting_since(asked);
        let r = self.checkout_or_hold_inner(room, deadline).await;
        self.client.entry.set_waiting(false);
        r
    }

    async fn checkout_or_hold_inner(
        &mut self,
        mut room: Option<Room>,
        deadline: Instant,
    ) -> Result<PooledConn, PoolError> {
        // Subscribed after the first failure, not before every checkout
        // (most wait for a busy pool, not a failover); a change between the
        // failure and the subscription is caught by `route_stale` below.
        let mut topology = None;
        let mut logged = false;
        loop {
            let got = match room.take() {
                Some(r) => r.open().await,
                None => self.pool.checkout().await,
            };
            let err = match got {
                Ok(c) => return Ok(c),
                // The pool was replaced (RELOAD, RECONNECT, a failover)
                // while this client waited: wait in the new one.
                Err(PoolError::ShuttingDown) if self.pool.is_closed() => {
                    self.reroute().await?;
                    continue;
                }
                // Nothing of the client's was sent: wait and retry.
                Err(e) if e.server_unavailable() => e,
                Err(e) => return Err(e),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(err);
            }
            if !logged {
                tracing::info!(client = self.id, error = %err, "server unreachable; holding the transaction until it returns or the topology changes");
                logged = true;
                // A Citus worker that cannot be reached may have left the
                // cluster or moved: read the metadata again now rather than
                // at the next periodic check.
                if let Some(cr) = self.citus.as_ref().filter(|c| c.on_group.is_some()) {
                    cr.citus.refresh_now.notify_one();
                }
            }
            let topology = topology.get_or_insert_with(|| self.shared.router.subscribe());
            if !self.route_stale() {
                let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), topology.changed()).await;
            }
            if self.route_stale() {
                self.reroute().await?;
            }
        }
    }

    /// The topology changed since this session last routed (a failover, a
    /// replica gone or back): keep the member if it still serves this port,
    /// else route again, waiting up to failover_hold_timeout for a leader.
    /// Runs only between transactions, so a client that is not in one sees
    /// nothing of a failover but a short wait.
    pub(super) async fn reroute(&mut self) -> Result<(), PoolError> {
        let role = if self.pool.key.read_only {
            Role::ReadOnly
        } else {
            Role::ReadWrite
        };
        let generation = self.shared.router.generation();
        self.rebalance = false;
        // A transaction routed to a Citus worker group belongs there: it
        // follows the group to its new leader (held while there is none),
        // never to the coordinator, which cannot reach the old one either.
        if let Some(g) = self.citus.as_ref().and_then(|c| c.on_group) {
            if Box::pin(self.follow_group(g)).await? {
                self.route_gen = generation;
                return Ok(());
            }
        }
        // One for the coordinator while it has no primary: wait for one
        // below, whatever node the session is still on.
        let want_home = self.citus.as_mut().is_some_and(|c| std::mem::take(&mut c.want_home));
        let router = &self.shared.router;
        let mut candidate = None;
        // The router decides whether the node still serves this port: the
        // coordinator's primary, a Citus worker group's leader, a replica.
        if !want_home && router.keeps(role, &self.route.member.addr) {
            // Read-only sessions also rebalance when the set of replicas
            // changes (one came back) or the counts drifted: move if another
            // replica has clearly fewer read sessions.
            candidate = match role {
                Role::ReadWrite => None,
                Role::ReadOnly => router.rebalance(&self.route.member),
            };
            if candidate.is_none() {
                if self.pool.is_closed() {
                    // Replaced (RELOAD, RECONNECT) while the node still
                    // serves: a new pool on the same node.
                    let key = &self.pool.key;
                    let pool = self
                        .shared
                        .pools
                        .pool(&key.database, &key.user, &self.route.member.addr, role);
                    pool.credentials().adopt(self.pool.credentials());
                    let route = Route::claim(self.route.member.clone(), role);
                    self.switch_pool(pool, route);
                }
                self.route_gen = generation;
                return Ok(());
            }
        }
        let hold = self.shared.settings.failover_hold();
        let route = match candidate {
            Some(c) => c,
            None => router.route_wait(role, hold).await.ok_or_else(|| {
                PoolError::NoServer(format!(
                    "no server is available for the {} port (no confirmed leader within failover_hold_timeout, {hold:?})",
                    role.as_str()
                ))
            })?,
        };
        let key = &self.pool.key;
        let pool = self
            .shared
            .pools
            .pool(&key.database, &key.user, &route.member.addr, role);
        pool.credentials().adopt(self.pool.credentials());
        tracing::info!(client = self.id, from = %self.route.member.addr, to = %route.member.addr, port = role.as_str(), "session moved to a new server");
        if let Some(c) = self.citus.as_mut() {
            // Wherever it was, the session is on the port's own node now.
            c.on_group = None;
        }
        self.switch_pool(pool, route);
        self.route_gen = generation;
        Ok(())
    }

    /// Brings a server connection's session parameters in line with the
    /// client's. On failure the caller drops `conn`, which closes it.
    pub(super) async fn sync_server(&mut self, conn: &mut PooledConn) -> Result<(), PoolError> {
        if let Some(sql) = params::sync_sql(&self.params, conn) {
            self.internal_query(conn, &sql).await?;
            conn.replace_settings(self.params.settings().to_vec());
        }
        // Facts about the server (in_hot_standby after a failover, ...).
        for &name in params::INFORMATIONAL {
            if let Some(v) = conn.param(name) {
                if self.params.set(name, v) {
                    encode::parameter_status(&mut self.to_client, name, v);
                }
            }
        }
        Ok(())
    }
}

/// The error says the server connection is gone, not that the server
/// refused what pgferry asked (a FATAL is the server closing it).
fn server_gone(e: &PoolError) -> bool {
    e.server_unavailable()
        || matches!(e, PoolError::Server { severity, .. } if severity == "FATAL" || severity == "PANIC")
}
