//! Shard-aware routing: before a transaction's first request goes out, the
//! session asks the Citus router where it belongs and moves its pool there
//! (the owning worker group's primary, or back to the coordinator).
//!
//! Only between transactions, with no server bound: a transaction runs
//! where its first statement sent it, to the end. A statement pgferry cannot
//! place with certainty goes to the coordinator, which can run anything.

use super::*;
use pgferry_routing::citus::analyze::{Plan, TxControl};
use pgferry_routing::citus::{Citus, Target};
use pgferry_routing::{GroupLeader, Member};

/// What routing a transaction asks of the caller.
pub(super) enum RouteStep {
    /// The session's pool is where the transaction goes.
    Ready,
    /// Back to the coordinator, and none is known now (a failover): the
    /// binding's slow path waits for one.
    NeedHome,
    /// The owning worker group is between leaders: wait for one.
    HoldForGroup(u32),
}

/// Per-session routing state (present only where routing applies: the
/// read-write port, transaction pooling, the Citus database).
pub(super) struct CitusRoute {
    pub citus: Arc<Citus>,
    /// The group the session's pool is on now (None: the coordinator).
    pub on_group: Option<u32>,
    /// The transaction belongs on the coordinator, which has no confirmed
    /// primary now: the slow path must wait for one, not keep the worker
    /// the session is still on (a worker leader is a node the port keeps).
    pub want_home: bool,
    /// Pools this session used on worker primaries (a handful), so moving
    /// between groups costs no shared lock.
    pools: Vec<Arc<Pool>>,
    /// The client's search_path as last parsed: (raw value, schemas).
    search_path: Option<(String, Vec<String>)>,
    formats: Vec<i16>,
}

impl CitusRoute {
    pub fn new(citus: Arc<Citus>) -> Self {
        CitusRoute {
            citus,
            on_group: None,
            want_home: false,
            pools: Vec::new(),
            search_path: None,
            formats: Vec::new(),
        }
    }
}

impl Session {
    /// Moves the session to where the transaction `frame` starts belongs.
    pub(super) fn route_transaction(&mut self, frame: &Frame) -> RouteStep {
        let Some(cr) = self.citus.as_mut() else {
            return RouteStep::Ready;
        };
        if !cr.citus.loaded() {
            return RouteStep::Ready;
        }
        let citus = cr.citus.clone();
        let target = self.citus_target(&citus, frame);
        tracing::trace!(client = self.id, ?target, search_path = ?self.params.value("search_path"), "citus: transaction target");
        citus.count(target);
        if self.pool.key.read_only {
            return match target {
                Target::Group(g) => self.route_group_read(g),
                Target::AnyPrimary => RouteStep::Ready,
                _ => self.move_home(),
            };
        }
        match target {
            Target::Group(g) => self.route_to_group(g),
            // Reference-table reads: the primary the session is on has them.
            Target::AnyPrimary => RouteStep::Ready,
            Target::AnyNode if citus.any_node => {
                let leaders = self.shared.router.group_leaders();
                match citus.next_node(leaders.len()) {
                    0 => self.move_home(),
                    k => {
                        let (g, m) = leaders[k - 1].clone();
                        if *m.addr != *self.route.member.addr {
                            self.move_to_group(g, m);
                        }
                        RouteStep::Ready
                    }
                }
            }
            Target::AnyNode | Target::Coordinator | Target::Undecided => self.move_home(),
        }
    }

    /// The read-only port: a single-shard read goes to a caught-up replica
    /// of the owning group (or its leader, with ro_fallback_to_primary),
    /// else where the port sends everything else.
    fn route_group_read(&mut self, g: u32) -> RouteStep {
        match self.shared.router.route_group_read(g) {
            Some(route) => {
                if *route.member.addr != *self.route.member.addr || self.pool.is_closed() {
                    self.move_to(g, route);
                }
                RouteStep::Ready
            }
            None => self.move_home(),
        }
    }

    fn route_to_group(&mut self, g: u32) -> RouteStep {
        match self.shared.router.group_leader(g) {
            GroupLeader::Leader(m) => {
                // (A retired pool on the same node: a fresh one.)
                if *m.addr != *self.route.member.addr || self.pool.is_closed() {
                    self.move_to_group(g, m);
                }
                RouteStep::Ready
            }
            GroupLeader::NoLeader => RouteStep::HoldForGroup(g),
            GroupLeader::Unknown => {
                if let Some(cr) = &self.citus {
                    cr.citus.counters.no_primary.fetch_add(1, Relaxed);
                }
                self.move_home()
            }
        }
    }

    /// Routes again within worker group `g` after the topology changed
    /// under a session placed there (its server unreachable, its pool
    /// retired): true when the session is on the group's leader (a replica,
    /// read-only) again, after holding while the group had none; false when
    /// the group is gone from the topology and the port's node takes over.
    pub(super) async fn follow_group(&mut self, g: u32) -> Result<bool, PoolError> {
        let from = self.route.member.addr.clone();
        let step = if self.pool.key.read_only {
            self.route_group_read(g)
        } else {
            self.route_to_group(g)
        };
        match step {
            RouteStep::Ready => {}
            RouteStep::HoldForGroup(g) => self.hold_for_group(g).await?,
            RouteStep::NeedHome => return Ok(false),
        }
        let on_group = self.citus.as_ref().is_some_and(|c| c.on_group == Some(g));
        if on_group && *from != *self.route.member.addr {
            tracing::info!(client = self.id, group = g, from = %from, to = %self.route.member.addr, "session follows its Citus worker group to a new server");
        }
        Ok(on_group && !self.pool.is_closed())
    }

    /// A worker group is between leaders (a failover or switchover): hold
    /// the transaction, as the coordinator's are held, until the topology
    /// names a new leader, for up to failover_hold_timeout.
    pub(super) async fn hold_for_group(&mut self, g: u32) -> Result<(), PoolError> {
        let hold = self.shared.settings.failover_hold();
        let deadline = Instant::now() + hold;
        let mut topology = self.shared.router.subscribe();
        self.client.entry.set_waiting(true);
        let r = loop {
            match self.route_to_group(g) {
                RouteStep::Ready => break Ok(()),
                RouteStep::NeedHome => {
                    self.route_gen = 0;
                    break Ok(());
                }
                RouteStep::HoldForGroup(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(PoolError::NoServer(format!(
                    "Citus worker group {g} has no leader (no new leader within failover_hold_timeout, {hold:?})"
                )));
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), topology.changed()).await;
        };
        self.client.entry.set_waiting(false);
        r
    }

    /// Answers a lone BEGIN (deferred: replayed where the first statement
    /// goes), the COMMIT/ROLLBACK of a deferred transaction that ran
    /// nothing, and the end of a deferred transaction that failed before
    /// reaching a server. With the simple protocol, or the extended one
    /// when the statement's whole run (Parse, Bind, Describe, Execute) has
    /// arrived. False: not such a request; handle it as usual.
    pub(super) fn answer_tx_control(&mut self, frame: &Frame) -> bool {
        let Some(cr) = self.citus.as_ref() else { return false };
        let deferred = self.pending_begin.is_some() || self.deferred_failed;
        if !(cr.citus.loaded() || deferred)
            || !self.replies.at_boundary()
            || self.skip_until_sync
            || self.lost_transaction.is_some()
        {
            return false;
        }
        let citus = cr.citus.clone();
        let Some((sql, run)) = self.tx_control_text(frame) else {
            return false;
        };
        let control = citus.analysis(&sql, self.search_path()).control;
        let (tag, status) = match (control, self.replies.status()) {
            (Some(TxControl::Begin(tag)), TxStatus::Idle) if !deferred => {
                let begin = match run {
                    None => frame.bytes.clone(),
                    Some(_) => {
                        let mut b = BytesMut::with_capacity(sql.len() + 6);
                        encode::query(&mut b, &sql);
                        b.freeze()
                    }
                };
                self.pending_begin = Some(begin);
                (tag, TxStatus::InTransaction)
            }
            // PostgreSQL ends a failed transaction with ROLLBACK whatever
            // the client asked.
            (Some(TxControl::Commit | TxControl::Rollback), _) if self.deferred_failed => {
                self.deferred_failed = false;
                ("ROLLBACK", TxStatus::Idle)
            }
            (Some(TxControl::Commit), _) if deferred => {
                self.pending_begin = None;
                ("COMMIT", TxStatus::Idle)
            }
            (Some(TxControl::Rollback), _) if deferred => {
                self.pending_begin = None;
                ("ROLLBACK", TxStatus::Idle)
            }
            _ => return false,
        };
        let mut b = BytesMut::with_capacity(32);
        if let Some(run) = &run {
            if run.parse {
                encode::parse_complete(&mut b);
            }
            encode::message(&mut b, backend::BIND_COMPLETE, |_| {});
            if run.describe {
                encode::message(&mut b, backend::NO_DATA, |_| {});
            }
            // The run's other messages are answered here too.
            let _ = self.rbuf.split_to(run.len);
        }
        encode::command_complete(&mut b, tag);
        if run.is_none() {
            encode::ready_for_query(&mut b, status);
        }
        self.replies.set_status(status);
        self.respond_local(b.freeze(), run.is_none(), || None);
        true
    }

    /// The text of a transaction-control statement `frame` runs, and for
    /// the extended protocol the rest of its run, already read. None for
    /// anything else (only texts that start like one are looked at: the
    /// others are analysed once, by the routing that follows).
    fn tx_control_text(&self, frame: &Frame) -> Option<(Bytes, Option<ExtendedRun>)> {
        let body = frame.body();
        match frame.tag {
            frontend::QUERY => {
                let sql = frontend::query(body).ok()?;
                starts_like_tx_control(sql).then(|| (frame.bytes.slice_ref(sql), None))
            }
            // An unnamed statement: parsed for this run only.
            frontend::PARSE => {
                let p = frontend::parse(body).ok()?;
                if !p.name.is_empty() || !starts_like_tx_control(p.query) {
                    return None;
                }
                let run = extended_run(&self.rbuf, b"", true)?;
                Some((frame.bytes.slice_ref(p.query), Some(run)))
            }
            // A named statement pgferry keeps (a statement cache): its
            // Parse was answered earlier.
            frontend::BIND => {
                let b = frontend::bind(body).ok()?;
                if !self.rewrite || b.statement.is_empty() {
                    return None;
                }
                let stmt = self.statements.get(b.statement)?;
                let sql = stmt.query();
                if !starts_like_tx_control(sql) || !no_params(body, b.rest_offset) {
                    return None;
                }
                let mut run = run_after_bind(&self.rbuf, b.portal)?;
                run.parse = false;
                Some((stmt.parse_tail.slice_ref(sql), Some(run)))
            }
            _ => None,
        }
    }

    /// Replays a deferred BEGIN on `conn`, the server the transaction's
    /// first statement chose, before that statement goes out.
    pub(super) async fn replay_begin(&mut self, conn: &mut ServerConn) -> Result<(), PoolError> {
        let Some(begin) = self.pending_begin.clone() else {
            return Ok(());
        };
        let sql = frontend::query(&begin[5..]).map_err(|_| PoolError::Closed)?;
        self.internal_query(conn, sql).await?;
        self.pending_begin = None;
        Ok(())
    }

    fn citus_target(&mut self, citus: &Citus, frame: &Frame) -> Target {
        self.target_at(citus, frame, 0, 0)
    }

    /// The target of the transaction `frame` starts; the messages after it
    /// start at `at` in the read buffer. A BEGIN that reaches here (its
    /// statement not yet known good, so not deferred) goes where the
    /// statement after it in the same write goes.
    fn target_at(&mut self, citus: &Citus, frame: &Frame, at: usize, depth: u8) -> Target {
        let body = frame.body();
        match frame.tag {
            frontend::QUERY => match frontend::query(body) {
                Ok(sql) => {
                    let a = citus.analysis(sql, self.search_path());
                    tracing::trace!(client = self.id, plan = ?a.plan, "citus: plan");
                    a.plan.target().unwrap_or(Target::Coordinator)
                }
                Err(_) => Target::Coordinator,
            },
            frontend::PARSE => {
                let Ok(p) = frontend::parse(body) else {
                    return Target::Coordinator;
                };
                let a = citus.analysis(p.query, self.search_path());
                if let (Some(TxControl::Begin(_)), 0) = (&a.control, depth) {
                    return self.target_after(citus, extended_run(&self.rbuf[at..], p.name, true), at);
                }
                match &a.plan {
                    Plan::Params(pp) => {
                        // The values come with the Bind that follows, if the
                        // client sent it along (drivers do: Parse, Bind,
                        // Execute, Sync in one write).
                        let Some(bind) = peek_bind(&self.rbuf[at..], p.name) else {
                            return Target::Coordinator;
                        };
                        let Some(cr) = self.citus.as_mut() else {
                            return Target::Coordinator;
                        };
                        bind_target(pp, bind, p.param_types, &mut cr.formats)
                    }
                    plan => plan.target().unwrap_or(Target::Coordinator),
                }
            }
            frontend::BIND => {
                let Ok(b) = frontend::bind(body) else {
                    return Target::Coordinator;
                };
                // Only a named statement pgferry keeps (transaction pooling
                // with a statement cache) has a text to look at.
                let stmt = if self.rewrite && !b.statement.is_empty() {
                    self.statements.get(b.statement).cloned()
                } else {
                    None
                };
                let Some(stmt) = stmt else {
                    return Target::Coordinator;
                };
                let query = stmt.query();
                let types = &stmt.parse_tail[query.len() + 1..];
                let a = citus.analysis(query, self.search_path());
                if let (Some(TxControl::Begin(_)), 0) = (&a.control, depth) {
                    return self.target_after(citus, run_after_bind(&self.rbuf[at..], b.portal), at);
                }
                let Some(cr) = self.citus.as_mut() else {
                    return Target::Coordinator;
                };
                match &a.plan {
                    Plan::Params(pp) => bind_target(pp, body, types, &mut cr.formats),
                    plan => plan.target().unwrap_or(Target::Coordinator),
                }
            }
            _ => Target::Coordinator,
        }
    }

    /// The target of the Parse or Bind that follows a BEGIN's run (`run`,
    /// from `at` in the read buffer), if the client sent one along.
    fn target_after(&mut self, citus: &Citus, run: Option<ExtendedRun>, at: usize) -> Target {
        let Some(run) = run else {
            return Target::Coordinator;
        };
        let start = at + run.len;
        match next_message(&self.rbuf, start) {
            Some((tag @ (frontend::PARSE | frontend::BIND), _, end)) => {
                // Rare (a BEGIN no server has checked yet): a copy is fine.
                let next = Frame {
                    tag,
                    bytes: Bytes::copy_from_slice(&self.rbuf[start..end]),
                };
                self.target_at(citus, &next, end, 1)
            }
            _ => Target::Coordinator,
        }
    }

    /// The client's search_path as a list of schemas (`$user` expanded),
    /// None when it is not known.
    fn search_path(&mut self) -> Option<&[String]> {
        let raw = self.params.value("search_path")?;
        let cr = self.citus.as_mut()?;
        if cr.search_path.as_ref().map(|s| s.0.as_str()) != Some(raw) {
            let schemas = parse_search_path(raw, &self.pool.settings.server_user);
            cr.search_path = Some((raw.to_owned(), schemas?));
        }
        cr.search_path.as_ref().map(|s| s.1.as_slice())
    }

    fn move_to_group(&mut self, group: u32, member: Arc<Member>) {
        self.move_to(group, Route::claim(member, Role::ReadWrite));
    }

    /// Moves the session's pool to `route`'s node, a member of worker
    /// group `group`.
    fn move_to(&mut self, group: u32, route: Route) {
        let Some(cr) = self.citus.as_mut() else { return };
        cr.pools.retain(|p| !p.is_closed());
        let pool = match cr.pools.iter().find(|p| *p.key.node == *route.member.addr) {
            Some(p) => p.clone(),
            None => {
                let key = &self.pool.key;
                let p = self
                    .shared
                    .pools
                    .pool(&key.database, &key.user, &route.member.addr, route.role);
                p.credentials().adopt(self.pool.credentials());
                cr.pools.push(p.clone());
                p
            }
        };
        cr.on_group = Some(group);
        cr.want_home = false;
        self.switch_pool(pool, route);
    }

    /// Back to the coordinator (the topology's primary).
    fn move_home(&mut self) -> RouteStep {
        if self.citus.as_ref().is_none_or(|c| c.on_group.is_none()) {
            return RouteStep::Ready;
        }
        let role = if self.pool.key.read_only {
            Role::ReadOnly
        } else {
            Role::ReadWrite
        };
        let Some(route) = self.shared.router.route(role) else {
            if let Some(cr) = self.citus.as_mut() {
                cr.on_group = None;
                cr.want_home = true;
            }
            return RouteStep::NeedHome;
        };
        let key = &self.pool.key;
        let pool = self
            .shared
            .pools
            .pool(&key.database, &key.user, &route.member.addr, role);
        pool.credentials().adopt(self.pool.credentials());
        if let Some(cr) = self.citus.as_mut() {
            cr.on_group = None;
            cr.want_home = false;
        }
        self.switch_pool(pool, route);
        RouteStep::Ready
    }

    /// Makes `pool` the session's pool (between transactions).
    pub(super) fn switch_pool(&mut self, pool: Arc<Pool>, route: Route) {
        self.pool.stats.cl_active.fetch_sub(1, Relaxed);
        pool.stats.cl_active.fetch_add(1, Relaxed);
        self.pool = pool;
        self.route = route;
    }
}

/// Whether a query text starts with BEGIN, START, COMMIT, END, ROLLBACK or
/// ABORT (after blanks): a cheap filter before the real parse decides.
fn starts_like_tx_control(sql: &[u8]) -> bool {
    // Runs for every lone simple query between transactions: no allocation.
    let mut word = [0u8; 9];
    let mut n = 0;
    for &b in sql.iter().skip_while(|b| b.is_ascii_whitespace()) {
        if !b.is_ascii_alphabetic() || n == word.len() {
            break;
        }
        word[n] = b.to_ascii_uppercase();
        n += 1;
    }
    matches!(
        &word[..n],
        b"BEGIN" | b"START" | b"COMMIT" | b"END" | b"ROLLBACK" | b"ABORT"
    )
}

/// The messages of a transaction-control statement's extended-protocol
/// run that follow its first one, as pgferry answers them.
#[derive(Debug, PartialEq, Eq)]
struct ExtendedRun {
    /// Bytes of the following messages (Bind, Describe, Execute).
    len: usize,
    /// The run started with a Parse (answered with ParseComplete).
    parse: bool,
    /// The portal was described (answered with NoData).
    describe: bool,
}

/// After an unnamed Parse of a parameterless statement: the Bind of
/// `statement` with no parameters, then the Execute of its portal
/// (optionally a Describe of it in between). None when the run is anything
/// else, or has not all arrived.
fn extended_run(buf: &[u8], statement: &[u8], parse: bool) -> Option<ExtendedRun> {
    let (tag, body, end) = next_message(buf, 0)?;
    if tag != frontend::BIND {
        return None;
    }
    let b = frontend::bind(body).ok()?;
    if b.statement != statement || !no_params(body, b.rest_offset) {
        return None;
    }
    let mut run = run_after_bind(&buf[end..], b.portal)?;
    run.len += end;
    run.parse = parse;
    Some(run)
}

/// After a Bind of `portal`: an optional Describe of it, then its Execute.
fn run_after_bind(buf: &[u8], portal: &[u8]) -> Option<ExtendedRun> {
    let (mut tag, mut body, mut end) = next_message(buf, 0)?;
    let mut describe = false;
    if tag == frontend::DESCRIBE {
        if frontend::target(body, "Describe").ok()? != (b'P', portal) {
            return None;
        }
        describe = true;
        (tag, body, end) = next_message(buf, end)?;
    }
    if tag != frontend::EXECUTE || body.split(|&c| c == 0).next() != Some(portal) {
        return None;
    }
    Some(ExtendedRun {
        len: end,
        parse: false,
        describe,
    })
}

/// The complete message at `at` in `buf`: tag, body, and where it ends.
fn next_message(buf: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let head = buf.get(at..at + 5)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let end = at.checked_add(1)?.checked_add(len)?;
    if len < 4 || end > buf.len() {
        return None;
    }
    Some((head[0], &buf[at + 5..end], end))
}

/// A Bind body (its values start at `rest`) binds no parameters.
fn no_params(body: &[u8], rest: usize) -> bool {
    let r = &body[rest..];
    let Some(n) = r.get(..2).map(|n| u16::from_be_bytes([n[0], n[1]]) as usize) else {
        return false;
    };
    let at = 2 + 2 * n;
    r.get(at..at + 2) == Some(&[0, 0])
}

/// Parameters read into arrays on the stack; statements with more go
/// through vectors.
const STACK_PARAMS: usize = 16;

/// The group a Bind's values send a parameter plan to. No allocation for
/// statements of up to [`STACK_PARAMS`] parameters.
fn bind_target(
    pp: &pgferry_routing::citus::analyze::ParamPlan,
    bind_body: &[u8],
    param_types: &[u8],
    formats: &mut Vec<i16>,
) -> Target {
    let Ok(b) = frontend::bind(bind_body) else {
        return Target::Coordinator;
    };
    let rest = &bind_body[b.rest_offset..];
    let mut values = [None; STACK_PARAMS];
    let mut declared = [0u32; STACK_PARAMS];
    let types = frontend::param_types(param_types).count();
    let group = match frontend::bind_params_into(rest, formats, &mut values) {
        Ok(n) if types <= STACK_PARAMS => {
            for (d, t) in declared.iter_mut().zip(frontend::param_types(param_types)) {
                *d = t;
            }
            pp.group(&values[..n], formats, &declared[..types])
        }
        Err(_) => return Target::Coordinator,
        Ok(_) => {
            let mut values = Vec::new();
            if frontend::bind_params(rest, formats, &mut values).is_err() {
                return Target::Coordinator;
            }
            let declared: Vec<u32> = frontend::param_types(param_types).collect();
            pp.group(&values, formats, &declared)
        }
    };
    match group {
        Some(0) | None => Target::Coordinator,
        Some(g) => Target::Group(g),
    }
}

/// The Bind for statement `name` among the complete messages already read
/// (before the next Parse or Sync).
fn peek_bind<'a>(buf: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut at = 0;
    loop {
        let (tag, body, end) = next_message(buf, at)?;
        match tag {
            frontend::BIND => {
                let b = frontend::bind(body).ok()?;
                return (b.statement == name).then_some(body);
            }
            frontend::DESCRIBE | frontend::FLUSH => at = end,
            _ => return None,
        }
    }
}

/// Parses a search_path value: comma-separated names, double-quoted ones
/// kept as written, others lowercased; `$user` is the server user. None
/// when it cannot be read with certainty.
fn parse_search_path(raw: &str, user: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for part in raw.split(',') {
        let p = part.trim();
        if p.is_empty() {
            continue;
        }
        let name = if let Some(q) = p.strip_prefix('"') {
            let inner = q.strip_suffix('"')?;
            if inner.contains('"') {
                return None;
            }
            inner.to_owned()
        } else {
            if p.contains('"') || p.contains(' ') {
                return None;
            }
            p.to_lowercase()
        };
        if name == "$user" {
            out.push(user.to_owned());
        } else {
            out.push(name);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_values() {
        assert_eq!(
            parse_search_path("\"$user\", public", "app").unwrap(),
            vec!["app".to_string(), "public".into()]
        );
        assert_eq!(
            parse_search_path("Tenant_A,\"Mixed\"", "u").unwrap(),
            vec!["tenant_a".to_string(), "Mixed".into()]
        );
        assert!(parse_search_path("\"a\"b\"", "u").is_none());
        assert_eq!(parse_search_path("", "u").unwrap(), Vec::<String>::new());
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn finds_the_bind_that_follows() {
        let bind = b"\0s1\0\0\0\0\0\0\0".to_vec();
        let mut buf = msg(b'D', b"Ss1\0");
        buf.extend(msg(b'B', &bind));
        buf.extend(msg(b'E', b"\0\0\0\0\0"));
        assert_eq!(peek_bind(&buf, b"s1"), Some(&bind[..]));
        assert_eq!(peek_bind(&buf, b"s2"), None, "another statement's Bind");
        assert_eq!(peek_bind(&buf[..buf.len() - 12], b"s1"), None, "incomplete Bind");
        let mut synced = msg(b'S', b"");
        synced.extend(msg(b'B', &bind));
        assert_eq!(peek_bind(&synced, b"s1"), None, "not past a Sync");
        assert_eq!(peek_bind(&[b'B', 0, 0, 0, 1], b""), None, "bad length");
    }
}

#[cfg(test)]
mod extended_run_tests {
    use super::*;

    fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
    }

    /// A Bind of `stmt` to `portal`, with `params` text parameters.
    fn bind(out: &mut Vec<u8>, portal: &[u8], stmt: &[u8], params: u16) {
        let mut b = [portal, b"\0", stmt, b"\0"].concat();
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&params.to_be_bytes());
        for _ in 0..params {
            b.extend_from_slice(&1i32.to_be_bytes());
            b.push(b'7');
        }
        b.extend_from_slice(&[0, 0]);
        msg(out, b'B', &b);
    }

    fn execute(out: &mut Vec<u8>, portal: &[u8]) {
        msg(out, b'E', &[portal, b"\0\0\0\0\0"].concat());
    }

    fn describe(out: &mut Vec<u8>, kind: u8, name: &[u8]) {
        msg(out, b'D', &[&[kind][..], name, b"\0"].concat());
    }

    #[test]
    fn bind_execute_and_an_optional_describe() {
        let mut buf = Vec::new();
        bind(&mut buf, b"", b"", 0);
        execute(&mut buf, b"");
        let len = buf.len();
        msg(&mut buf, b'S', b"");
        assert_eq!(
            extended_run(&buf, b"", true),
            Some(ExtendedRun {
                len,
                parse: true,
                describe: false
            })
        );
        let mut buf = Vec::new();
        bind(&mut buf, b"p1", b"", 0);
        describe(&mut buf, b'P', b"p1");
        execute(&mut buf, b"p1");
        let len = buf.len();
        // What follows the run (here the next statement's Parse) is not part of it.
        msg(&mut buf, b'P', b"\0SELECT 1\0\0\0");
        assert_eq!(
            extended_run(&buf, b"", true),
            Some(ExtendedRun {
                len,
                parse: true,
                describe: true
            })
        );
    }

    #[test]
    fn anything_else_is_not_a_run() {
        let run = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut buf = Vec::new();
            f(&mut buf);
            extended_run(&buf, b"", true)
        };
        assert_eq!(run(&|b| bind(b, b"", b"", 0)), None, "no Execute yet");
        assert_eq!(run(&|b| execute(b, b"")), None, "no Bind");
        assert_eq!(
            run(&|b| {
                bind(b, b"", b"other", 0);
                execute(b, b"");
            }),
            None,
            "another statement"
        );
        assert_eq!(
            run(&|b| {
                bind(b, b"", b"", 1);
                execute(b, b"");
            }),
            None,
            "parameters"
        );
        assert_eq!(
            run(&|b| {
                bind(b, b"a", b"", 0);
                execute(b, b"b");
            }),
            None,
            "another portal"
        );
        assert_eq!(
            run(&|b| {
                bind(b, b"", b"", 0);
                describe(b, b'S', b"");
                execute(b, b"");
            }),
            None,
            "a statement Describe"
        );
        assert_eq!(
            run(&|b| {
                bind(b, b"", b"", 0);
                msg(b, b'H', b"");
                execute(b, b"");
            }),
            None,
            "a Flush in between"
        );
        let mut whole = Vec::new();
        bind(&mut whole, b"", b"", 0);
        execute(&mut whole, b"");
        for cut in 0..whole.len() {
            assert_eq!(extended_run(&whole[..cut], b"", true), None, "cut at {cut}");
        }
        assert_eq!(extended_run(&[b'B', 0, 0, 0, 2], b"", true), None, "bad length");
        assert_eq!(
            extended_run(&[b'B', 255, 255, 255, 255], b"", true),
            None,
            "huge length"
        );
    }

    #[test]
    fn parameter_counts() {
        for (params, none) in [(0u16, true), (1, false), (3, false)] {
            let mut buf = Vec::new();
            bind(&mut buf, b"", b"s", params);
            let body = &buf[5..];
            let b = frontend::bind(body).unwrap();
            assert_eq!(no_params(body, b.rest_offset), none, "{params} parameters");
        }
        assert!(!no_params(b"\0s\0\0", 3), "truncated");
    }
}

#[cfg(test)]
mod tx_control_filter_tests {
    use super::starts_like_tx_control;

    #[test]
    fn filter() {
        for sql in [
            "BEGIN",
            "  begin isolation level serializable",
            "START TRANSACTION",
            "commit",
            "END",
            "ROLLBACK",
            "abort",
        ] {
            assert!(starts_like_tx_control(sql.as_bytes()), "{sql}");
        }
        for sql in ["SELECT 1", "BEGINNING", "", "SET x = 1", "ENDS"] {
            assert!(!starts_like_tx_control(sql.as_bytes()), "{sql}");
        }
    }
}
