//! The pool against a fake PostgreSQL server: each connection the pool
//! opens is one end of an in-memory pipe (through the `Connect` seam),
//! and the fake speaks the real protocol bytes on the other.

use super::*;
use crate::connect::{Connect, Connecting, Dial};
use bytes::BytesMut;
use pgferry_protocol::backend::TxStatus;
use pgferry_protocol::encode::{self, Severity};
use pgferry_protocol::startup::{decode_startup, StartupPacket};
use pgferry_protocol::{decode_frame, frontend, Frame};
use pgferry_tls::stream::MaybeTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::oneshot;

/// How the fake answers a login.
#[derive(Clone, Copy)]
enum Login {
    /// AuthenticationOk straight away.
    Trust,
    /// Asks for a cleartext password; anything else than this one gets
    /// FATAL 28P01, as PostgreSQL answers.
    Password(&'static str),
    /// Logs in, but reports in_hot_standby = on (a demoted leader).
    Standby,
}

/// A fake server. Connection n (from 1) gets backend pid 1000 + n.
struct Fake {
    login: Login,
    opened: AtomicU64,
    /// The startup parameters of each connection, in order.
    startups: Mutex<Vec<Vec<(String, String)>>>,
    /// Per live connection (by pid): closes the server's end when sent
    /// a sender, which is answered once that end is gone.
    kill: Mutex<HashMap<u32, oneshot::Sender<oneshot::Sender<()>>>>,
}

impl Fake {
    fn new(login: Login) -> Arc<Fake> {
        Arc::new(Fake {
            login,
            opened: AtomicU64::new(0),
            startups: Mutex::default(),
            kill: Mutex::default(),
        })
    }

    fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// The server ends connection `pid` as a shutdown does: FATAL 57P01,
    /// then closes. Returns once its end is closed.
    async fn terminate(&self, pid: u32) {
        let kill = self.kill.lock().unwrap().remove(&pid).expect("a live connection");
        let (done, closed) = oneshot::channel();
        kill.send(done).expect("the connection's task is running");
        closed.await.expect("the server end closes");
    }

    async fn serve(self: Arc<Fake>, mut s: DuplexStream, pid: u32) {
        let mut buf = BytesMut::new();
        let params = loop {
            match decode_startup(&mut buf).expect("a valid startup packet") {
                Some(StartupPacket::Startup { params, .. }) => break params,
                Some(p) => panic!("unexpected startup packet {p:?}"),
                None if s.read_buf(&mut buf).await.unwrap() == 0 => return,
                None => {}
            }
        };
        self.startups.lock().unwrap().push(params);
        let mut out = BytesMut::new();
        if let Login::Password(want) = self.login {
            encode::auth_cleartext(&mut out);
            s.write_all(&out).await.unwrap();
            out.clear();
            let Some(f) = read_frame(&mut s, &mut buf).await else {
                return;
            };
            assert_eq!(f.tag, frontend::PASSWORD);
            if f.body() != format!("{want}\0").as_bytes() {
                encode::error_response(
                    &mut out,
                    Severity::Fatal,
                    "28P01",
                    "password authentication failed for user",
                );
                let _ = s.write_all(&out).await;
                return;
            }
        }
        encode::auth_ok(&mut out);
        encode::parameter_status(&mut out, "server_version", "15.0 (fake)");
        let standby = matches!(self.login, Login::Standby);
        encode::parameter_status(&mut out, "in_hot_standby", if standby { "on" } else { "off" });
        encode::backend_key_data(&mut out, pid, pid * 7);
        encode::ready_for_query(&mut out, TxStatus::Idle);
        s.write_all(&out).await.unwrap();
        let (kill, mut killed) = oneshot::channel();
        self.kill.lock().unwrap().insert(pid, kill);
        loop {
            tokio::select! {
                f = read_frame(&mut s, &mut buf) => match f {
                    Some(f) if f.tag != frontend::TERMINATE => {}
                    _ => return,
                },
                done = &mut killed => {
                    out.clear();
                    encode::error_response(&mut out, Severity::Fatal, "57P01", "terminating connection due to administrator command");
                    let _ = s.write_all(&out).await;
                    drop(s);
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
            }
        }
    }
}

/// The next whole message from the client; None once it has closed.
async fn read_frame(s: &mut DuplexStream, buf: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Some(f) = decode_frame(buf, 1 << 20).expect("a valid frame") {
            return Some(f);
        }
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// Every connection the pool asks for is a new pipe to `Fake::serve`.
impl Connect for Arc<Fake> {
    fn connect<'a>(&'a self, d: Dial<'a>) -> Connecting<'a> {
        Box::pin(async move {
            let pid = 1000 + self.opened.fetch_add(1, Relaxed) as u32 + 1;
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(self.clone().serve(theirs, pid));
            ServerConn::over_stream(
                MaybeTls::Memory(ours),
                d.id,
                d.addr.clone(),
                d.creds,
                d.startup,
                d.max_message,
            )
            .await
        })
    }
}

fn settings(pool_size: usize, query_wait_timeout: Duration) -> PoolSettings {
    let c = pgferry_config::Config::from_toml(
        "[topology]\nsource = \"static\"\nprimary = \"127.0.0.1:5432\"\n[auth]\nmethod = \"trust\"\n",
    )
    .unwrap();
    let mut s = c.pool_settings("app", "app");
    s.pool_size = pool_size;
    s.min_pool_size = 0;
    s.reserve_pool_size = 0;
    s.query_wait_timeout = query_wait_timeout;
    s
}

fn pool_of(fake: &Arc<Fake>, settings: PoolSettings, password: Option<&str>, read_only: bool) -> Arc<Pool> {
    let key = PoolKey {
        database: "app".into(),
        user: "app".into(),
        node: Arc::new(NodeAddr {
            host: "fake".into(),
            port: 5432,
        }),
        read_only,
    };
    let creds = ServerCredentials::new("app", password.map(str::to_owned));
    Pool::with_connector(key, settings, creds, Vec::new(), 1 << 20, Arc::new(fake.clone()))
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn checkout_logs_in_and_checkin_keeps_the_connection() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(2, WAIT), None, false);
    let c = pool.checkout().await.expect("the fake logs us in");
    assert_eq!((c.backend_pid, c.backend_key), (1001, 7007));
    assert_eq!(c.param("server_version"), Some("15.0 (fake)"));
    let startup = fake.startups.lock().unwrap()[0].clone();
    assert!(startup.contains(&("user".into(), "app".into())), "{startup:?}");
    assert!(startup.contains(&("database".into(), "app".into())), "{startup:?}");
    assert_eq!(pool.stats.sv_active.load(Relaxed), 1);
    assert_eq!(pool.stats.servers_opened.load(Relaxed), 1);
    let id = c.id;
    c.checkin();
    assert_eq!((pool.stats.sv_active.load(Relaxed), pool.idle_count()), (0, 1));
    // The idle connection serves the next checkout: no second login.
    let again = pool.try_checkout().expect("the idle connection");
    assert_eq!(again.id, id);
    assert_eq!(fake.opened(), 1);
    again.checkin();
    let params = pool.startup_params().await.unwrap();
    assert!(params.contains(&("server_version".into(), "15.0 (fake)".into())));
}

#[tokio::test]
async fn a_refused_login_is_the_servers_error() {
    let fake = Fake::new(Login::Password("right"));
    let wrong = pool_of(&fake, settings(2, WAIT), Some("wrong"), false);
    let e = wrong.checkout().await.err().expect("the fake refuses the password");
    assert!(matches!(&e, PoolError::Server { code, .. } if code == "28P01"), "{e:?}");
    assert!(!e.server_unavailable(), "a wrong password is not worth waiting for");
    assert_eq!(wrong.stats.server_errors.load(Relaxed), 1);
    assert_eq!(
        (wrong.stats.sv_active.load(Relaxed), wrong.stats.sv_login.load(Relaxed)),
        (0, 0)
    );
    // No password at all: refused before anything is sent.
    let none = pool_of(&fake, settings(2, WAIT), None, false);
    let e = none.checkout().await.err().expect("no password to give");
    assert!(matches!(e, PoolError::Auth(_)), "{e:?}");
    let right = pool_of(&fake, settings(2, WAIT), Some("right"), false);
    right.checkout().await.expect("the right password logs in").checkin();
}

#[tokio::test]
async fn a_server_in_recovery_serves_reads_only() {
    let fake = Fake::new(Login::Standby);
    let rw = pool_of(&fake, settings(2, WAIT), None, false);
    let e = rw.checkout().await.err().expect("a standby is no leader");
    assert!(matches!(e, PoolError::InRecovery(_)), "{e:?}");
    assert!(e.server_unavailable());
    let ro = pool_of(&fake, settings(2, WAIT), None, true);
    ro.checkout()
        .await
        .expect("a standby serves the read-only port")
        .checkin();
}

#[tokio::test]
async fn pool_size_bounds_checkouts_and_a_waiter_gets_the_returned_connection() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(1, WAIT), None, false);
    let first = pool.checkout().await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let c = pool.checkout().await?;
            let id = c.id;
            c.checkin();
            Ok::<_, PoolError>(id)
        })
    };
    until("the second checkout waits", || pool.stats.cl_waiting.load(Relaxed) == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "pool_size = 1 allows one connection in use");
    assert_eq!(fake.opened(), 1);
    let id = first.id;
    first.checkin();
    let got = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(got, id, "the waiter gets the connection given back");
    assert_eq!(fake.opened(), 1);
    assert_eq!(pool.stats.cl_waiting.load(Relaxed), 0);
}

#[tokio::test]
async fn a_waiter_gives_up_after_query_wait_timeout() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(1, Duration::from_millis(100)), None, false);
    let held = pool.checkout().await.unwrap();
    let e = pool.checkout().await.err().expect("no connection within 100 ms");
    assert!(matches!(e, PoolError::WaitTimeout), "{e:?}");
    assert_eq!(pool.stats.wait_timeouts.load(Relaxed), 1);
    held.checkin();
}

#[tokio::test]
async fn a_connection_the_server_closed_while_idle_is_not_handed_out() {
    // Checked out again at once and after a pause: `is_stale` asks
    // differently below and above TRUST_REACTOR_FOR.
    for pause in [Duration::ZERO, 2 * crate::server::TRUST_REACTOR_FOR] {
        let fake = Fake::new(Login::Trust);
        let pool = pool_of(&fake, settings(2, WAIT), None, false);
        let c = pool.checkout().await.unwrap();
        let (id, pid) = (c.id, c.backend_pid);
        c.checkin();
        fake.terminate(pid).await;
        tokio::time::sleep(pause).await;
        let c = pool.checkout().await.expect("a new connection");
        assert_ne!(c.id, id, "the closed connection was handed out after {pause:?}");
        assert_eq!(c.backend_pid, 1002);
        assert_eq!(fake.opened(), 2);
        assert_eq!(pool.stats.servers_closed.load(Relaxed), 1);
        c.checkin();
    }
}

/// Thread per core: checkout takes a connection made on the caller's own
/// event loop when one is idle (even below the top of the stack), else the
/// most recently used of any loop.
#[tokio::test]
async fn checkout_prefers_a_connection_of_the_callers_event_loop() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(3, WAIT), None, false);
    crate::affinity::set_current(1);
    let on_1 = pool.checkout().await.unwrap();
    crate::affinity::set_current(2);
    let on_2a = pool.checkout().await.unwrap();
    let on_2b = pool.checkout().await.unwrap();
    assert_eq!((on_1.home, on_2a.home, on_2b.home), (1, 2, 2));
    let (id_1, id_2a, id_2b) = (on_1.id, on_2a.id, on_2b.id);
    // Idle stack, bottom to top: loop 1's, then loop 2's two.
    on_1.checkin();
    on_2a.checkin();
    on_2b.checkin();
    crate::affinity::set_current(1);
    let c = pool.try_checkout().expect("idle connections");
    assert_eq!(c.id, id_1, "loop 1 gets the connection its own reactor watches");
    // Loop 1 has none left and the pool is full (3 of 3): it falls back
    // to the top of the stack.
    let d = pool.try_checkout().expect("idle connections");
    assert_eq!(d.id, id_2b, "then the most recently used of another loop");
    crate::affinity::set_current(2);
    let e = pool.try_checkout().expect("the last idle connection");
    assert_eq!(e.id, id_2a);
    assert_eq!(fake.opened(), 3);
    for c in [c, d, e] {
        c.checkin();
    }
    crate::affinity::set_current(0);
}

/// Below pool_size, a loop without an idle connection of its own opens one
/// rather than borrow another loop's: each loop comes to own connections.
#[tokio::test]
async fn a_loop_opens_its_own_connection_while_the_pool_has_room() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(3, WAIT), None, false);
    crate::affinity::set_current(2);
    let on_2 = pool.checkout().await.unwrap();
    let id_2 = on_2.id;
    on_2.checkin();
    crate::affinity::set_current(1);
    assert!(
        pool.try_checkout().is_none(),
        "the fast path does not hand loop 1 loop 2's connection while there is room"
    );
    let on_1 = pool.checkout().await.unwrap();
    assert_eq!((on_1.home, fake.opened()), (1, 2), "a new connection, opened on loop 1");
    assert_ne!(on_1.id, id_2);
    on_1.checkin();
    crate::affinity::set_current(2);
    let again = pool.try_checkout().expect("loop 2's own idle connection");
    assert_eq!(again.id, id_2);
    again.checkin();
    crate::affinity::set_current(0);
}

#[test]
fn a_borrowed_key_finds_exactly_its_pool_key() {
    let node = |port| NodeAddr { host: "h".into(), port };
    let owned = |db: &str, user: &str, port, read_only| PoolKey {
        database: db.into(),
        user: user.into(),
        node: Arc::new(node(port)),
        read_only,
    };
    let keys = [
        owned("a", "u", 1, false),
        owned("a", "u", 1, true),
        owned("a", "u", 2, false),
        owned("a", "v", 1, false),
        owned("b", "u", 1, false),
        // Same bytes split differently: must not collide as equal.
        owned("ab", "", 1, false),
        owned("", "ab", 1, false),
    ];
    let map: HashMap<PoolKey, usize> = keys.iter().cloned().enumerate().map(|(i, k)| (k, i)).collect();
    for (i, k) in keys.iter().enumerate() {
        let r = PoolKeyRef {
            database: &k.database,
            user: &k.user,
            node: &k.node,
            read_only: k.read_only,
        };
        assert_eq!(map.get(&r as &dyn AsPoolKeyRef), Some(&i), "{k:?}");
        assert_eq!(map.get(k), Some(&i));
    }
    let n = node(3);
    let missing = PoolKeyRef {
        database: "a",
        user: "u",
        node: &n,
        read_only: false,
    };
    assert_eq!(map.get(&missing as &dyn AsPoolKeyRef), None);
}

/// A checkout running in its own task, reporting the connection it got
/// (and giving it back at once unless `keep`).
fn spawn_checkout(
    pool: &Arc<Pool>,
    keep: bool,
) -> tokio::task::JoinHandle<Result<(u64, Option<PooledConn>), PoolError>> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let c = pool.checkout().await?;
        let id = c.id;
        if keep {
            return Ok((id, Some(c)));
        }
        c.checkin();
        Ok((id, None))
    })
}

async fn waiting(pool: &Arc<Pool>, n: usize) {
    until(&format!("{n} clients wait"), || {
        pool.stats.cl_waiting.load(Relaxed) == n
    })
    .await;
}

/// Waiters are served in arrival order, each with the very connection the
/// previous one gave back (no new connection, no idle-stack pass).
#[tokio::test]
async fn waiters_are_served_first_come_first_served_with_the_returned_connection() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(1, WAIT), None, false);
    let first = pool.checkout().await.unwrap();
    let id = first.id;
    let mut waiters = Vec::new();
    for n in 1..=3 {
        waiters.push(spawn_checkout(&pool, true));
        waiting(&pool, n).await;
    }
    let mut held = first;
    for (n, w) in waiters.into_iter().enumerate() {
        held.checkin();
        let (got, c) = tokio::time::timeout(WAIT, w).await.unwrap().unwrap().unwrap();
        assert_eq!(got, id, "waiter {n} gets the returned connection");
        held = c.unwrap();
        assert_eq!(
            pool.stats.cl_waiting.load(Relaxed),
            2 - n,
            "the others still wait, in order"
        );
    }
    held.checkin();
    assert_eq!(fake.opened(), 1);
    assert_eq!(pool.idle_count(), 1);
}

/// A client that leaves while waiting loses its place, not the pool's
/// connection: also when it had already been handed the connection but
/// had not run yet.
#[tokio::test(flavor = "current_thread")]
async fn a_waiter_that_leaves_passes_on_what_it_was_given() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(1, WAIT), None, false);
    let first = pool.checkout().await.unwrap();
    let id = first.id;
    let gone_early = spawn_checkout(&pool, true);
    waiting(&pool, 1).await;
    let handed = spawn_checkout(&pool, true);
    waiting(&pool, 2).await;
    let last = spawn_checkout(&pool, true);
    waiting(&pool, 3).await;

    gone_early.abort();
    assert!(gone_early.await.err().expect("cancelled").is_cancelled());
    // The first in line now is `handed`: it is given the connection, and
    // leaves before its task runs again (one thread: no await between).
    first.checkin();
    handed.abort();
    assert!(handed.await.err().expect("cancelled").is_cancelled());
    let (got, c) = tokio::time::timeout(WAIT, last).await.unwrap().unwrap().unwrap();
    assert_eq!(got, id);
    assert_eq!(fake.opened(), 1);
    assert_eq!(pool.stats.cl_waiting.load(Relaxed), 0);
    c.unwrap().checkin();
    assert_eq!(pool.idle_count(), 1);
}

/// A connection closed instead of given back still makes room: the first
/// waiter opens a new one.
#[tokio::test]
async fn a_discarded_connection_makes_room_for_a_waiter() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(1, WAIT), None, false);
    let first = pool.checkout().await.unwrap();
    let id = first.id;
    let w = spawn_checkout(&pool, false);
    waiting(&pool, 1).await;
    first.discard("test");
    let (got, _) = tokio::time::timeout(WAIT, w).await.unwrap().unwrap().unwrap();
    assert_ne!(got, id);
    assert_eq!(fake.opened(), 2);
}

/// A connection the server closed while it was being handed over is not
/// used: the waiter opens a new one.
#[tokio::test]
async fn a_handed_over_connection_the_server_closed_is_not_used() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(1, WAIT), None, false);
    let first = pool.checkout().await.unwrap();
    let (id, pid) = (first.id, first.backend_pid);
    let w = spawn_checkout(&pool, false);
    waiting(&pool, 1).await;
    fake.terminate(pid).await;
    first.checkin();
    let (got, _) = tokio::time::timeout(WAIT, w).await.unwrap().unwrap().unwrap();
    assert_ne!(got, id, "the closed connection was handed out");
    assert_eq!(fake.opened(), 2);
    assert_eq!(pool.stats.servers_closed.load(Relaxed), 1);
}

/// query_wait_timeout holds for every waiter, in order, without a timer
/// each; a waiter served before its time is not timed out.
#[tokio::test]
async fn waiters_time_out_in_order_after_query_wait_timeout() {
    let fake = Fake::new(Login::Trust);
    let timeout = Duration::from_millis(300);
    let pool = pool_of(&fake, settings(1, timeout), None, false);
    let held = pool.checkout().await.unwrap();
    let t0 = Instant::now();
    let a = spawn_checkout(&pool, true);
    waiting(&pool, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = spawn_checkout(&pool, true);
    waiting(&pool, 2).await;
    let e = a.await.unwrap().err().expect("a times out");
    assert!(matches!(e, PoolError::WaitTimeout), "{e:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= timeout && waited < timeout + Duration::from_millis(250),
        "{waited:?}"
    );
    assert_eq!(pool.stats.cl_waiting.load(Relaxed), 1, "b has time left");
    let id = held.id;
    held.checkin();
    let (got, c) = b.await.unwrap().unwrap();
    assert_eq!(got, id);
    assert_eq!(pool.stats.wait_timeouts.load(Relaxed), 1);
    c.unwrap().checkin();
}

/// Shutting the pool down answers every waiter at once.
#[tokio::test]
async fn shutting_down_answers_the_waiters() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(1, WAIT), None, false);
    let held = pool.checkout().await.unwrap();
    let a = spawn_checkout(&pool, false);
    let b = spawn_checkout(&pool, false);
    waiting(&pool, 2).await;
    pool.shut_down("test");
    for w in [a, b] {
        let e = tokio::time::timeout(WAIT, w).await.unwrap().unwrap().err().unwrap();
        assert!(matches!(e, PoolError::ShuttingDown), "{e:?}");
    }
    held.checkin();
    assert_eq!(pool.idle_count(), 0, "a pool shut down keeps nothing");
}

/// reserve_pool_size connections open for a client that waited
/// reserve_pool_timeout, and go back to the reserve.
#[tokio::test]
async fn a_long_wait_gets_a_reserve_connection() {
    let fake = Fake::new(Login::Trust);
    let mut s = settings(1, WAIT);
    s.reserve_pool_size = 1;
    s.reserve_pool_timeout = Duration::from_millis(100);
    let pool = pool_of(&fake, s, None, false);
    let held = pool.checkout().await.unwrap();
    let t0 = Instant::now();
    let c = tokio::time::timeout(WAIT, pool.checkout()).await.unwrap().unwrap();
    let id = c.id;
    assert!(t0.elapsed() >= Duration::from_millis(100), "{:?}", t0.elapsed());
    assert_ne!(id, held.id);
    assert_eq!(fake.opened(), 2);
    // Both in use: a third waits past the reserve timeout and gets the
    // reserve connection when it comes back.
    let third = spawn_checkout(&pool, false);
    waiting(&pool, 1).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!third.is_finished());
    c.checkin();
    let (got, _) = tokio::time::timeout(WAIT, third).await.unwrap().unwrap().unwrap();
    assert_eq!(got, id);
    assert_eq!(fake.opened(), 2);
    held.checkin();
}

/// A wait in the pool's queue in its own task.
fn spawn_queue(pool: &Arc<Pool>) -> tokio::task::JoinHandle<Queued> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.queue().await.expect("not closed, no timeout") })
}

/// `queue` (the session's in-place wait) never connects: it yields the
/// connection another client gives back, or room when one was closed; an
/// unused room goes on to the next waiter, not back to nobody.
#[tokio::test(flavor = "current_thread")]
async fn queue_yields_a_returned_connection_or_room_and_an_unused_room_passes_on() {
    let fake = Fake::new(Login::Trust);
    let pool = pool_of(&fake, settings(1, WAIT), None, false);
    let first = pool.checkout().await.unwrap();
    let id = first.id;
    let handed = |q: Queued| match q {
        Queued::Conn(c) => c,
        Queued::Room(_) => panic!("the returned connection"),
    };
    let room = |q: Queued| match q {
        Queued::Room(r) => r,
        Queued::Conn(_) => panic!("room"),
    };

    // Handed over: the same connection, no login.
    let q = spawn_queue(&pool);
    waiting(&pool, 1).await;
    first.checkin();
    let c = handed(tokio::time::timeout(WAIT, q).await.unwrap().unwrap());
    assert_eq!(c.id, id);
    assert_eq!(fake.opened(), 1);

    // Closed instead: room, and a waiter behind it.
    let q = spawn_queue(&pool);
    waiting(&pool, 1).await;
    let next = spawn_checkout(&pool, true);
    waiting(&pool, 2).await;
    c.discard("test");
    let r = room(tokio::time::timeout(WAIT, q).await.unwrap().unwrap());
    assert_eq!(fake.opened(), 1, "queue itself never connects");
    assert_eq!(pool.stats.cl_waiting.load(Relaxed), 1);
    // Dropped unused: the waiter behind gets it and opens a connection.
    drop(r);
    let (got, c) = tokio::time::timeout(WAIT, next).await.unwrap().unwrap().unwrap();
    assert_ne!(got, id);
    assert_eq!(fake.opened(), 2);

    // And a room that is used opens a connection for its holder.
    let q = spawn_queue(&pool);
    waiting(&pool, 1).await;
    c.unwrap().discard("test");
    let r = room(tokio::time::timeout(WAIT, q).await.unwrap().unwrap());
    let opened = r.open().await.unwrap();
    assert_ne!(opened.id, got);
    assert_eq!(fake.opened(), 3);
    assert_eq!(pool.stats.cl_waiting.load(Relaxed), 0);
}

/// Room given at once when the pool has some (no wait counted), and a
/// `Room::open` dropped while it waits for a shared limit
/// (max_db_connections) gives the room back: the next client gets it at
/// once, and the limit it did not get is not held either.
#[tokio::test]
async fn room_at_once_and_an_open_dropped_while_waiting_gives_it_back() {
    let fake = Fake::new(Login::Trust);
    let shared = Arc::new(Semaphore::new(0));
    let key = pool_of(&fake, settings(1, WAIT), None, false).key.clone();
    let pool = Pool::with_connector(
        key,
        settings(1, WAIT),
        ServerCredentials::new("app", None),
        vec![shared.clone()],
        1 << 20,
        Arc::new(fake.clone()),
    );
    let room = |q: Result<Queued, PoolError>| match q {
        Ok(Queued::Room(r)) => r,
        Ok(Queued::Conn(_)) => panic!("room, no connection to hand over"),
        Err(e) => panic!("room, not {e}"),
    };
    let r = room(tokio::time::timeout(WAIT, pool.queue()).await.expect("room at once"));
    assert_eq!(pool.stats.cl_waiting.load(Relaxed), 0, "nothing waited");
    // The shared limit has no room: open waits, and is given up.
    assert!(tokio::time::timeout(Duration::from_millis(50), r.open()).await.is_err());
    assert_eq!(fake.opened(), 0);
    // The pool's only room is free again: had the dropped open kept it,
    // this queue would wait for query_wait_timeout.
    let r = room(
        tokio::time::timeout(Duration::from_secs(1), pool.queue())
            .await
            .expect("the room was given back"),
    );
    shared.add_permits(1);
    let c = tokio::time::timeout(WAIT, r.open()).await.unwrap().unwrap();
    assert_eq!(fake.opened(), 1);
    assert_eq!(shared.available_permits(), 0, "held by the connection");
    c.checkin();
    assert_eq!(shared.available_permits(), 1, "given back with it");
}
