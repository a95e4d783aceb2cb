//! One connection to a PostgreSQL server.

use crate::addr::NodeAddr;
use crate::error::PoolError;
use crate::login::{login, ServerCredentials};
use crate::statements::ServerStatements;
use bytes::BytesMut;
use pgferry_protocol::encode;
use pgferry_tls::stream::{MaybeTls, ServerStream};
use pgferry_tls::Connector;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// The framed stream lives in its own module (login uses it too); these
// paths are the ones other crates use.
pub use crate::wire::{fill, poll_fill, Wire};

/// A logged-in server connection and what pgferry knows of its session.
/// How long after its last use an idle connection is judged by the
/// reactor's readiness alone (see [`ServerConn::is_stale`]).
pub const TRUST_REACTOR_FOR: Duration = Duration::from_micros(100);

pub struct ServerConn {
    pub wire: Wire,
    /// Process-unique id, for logs and the admin console.
    pub id: u64,
    pub addr: Arc<NodeAddr>,
    /// The server's own BackendKeyData, for forwarding cancel requests.
    pub backend_pid: u32,
    pub backend_key: u32,
    /// Values the server reported with ParameterStatus.
    pub params: Vec<(String, String)>,
    /// Settings that PostgreSQL does not report but pgferry changed on this
    /// session (search_path on PostgreSQL < 18, statement_timeout, ...).
    /// Change them through the methods below, which keep the fingerprint.
    settings: Vec<(String, String)>,
    /// Cached fingerprint of `params` and `settings` (see the proxy's
    /// `params::fingerprint`); None when stale.
    pub fingerprint: Option<u64>,
    /// Global prepared statements present on this session.
    pub statements: ServerStatements,
    pub created: Instant,
    pub idle_since: Instant,
    /// Transactions run on it, for the admin console.
    pub uses: u64,
    /// A duplicate of the socket, through which the pool can cut the
    /// connection while a session holds it (failover: nothing more may
    /// reach a demoted primary). None over an in-memory stream (tests),
    /// which has no socket.
    pub(crate) sever: Option<Arc<socket2::Socket>>,
    /// The event loop whose reactor registered the socket (`affinity`).
    pub home: u16,
}

impl ServerConn {
    /// Connects and logs in, within `timeout`. `startup`: the
    /// StartupMessage's parameters after `user` (`database` and options).
    pub async fn connect(
        id: u64,
        addr: Arc<NodeAddr>,
        creds: &ServerCredentials,
        startup: &[(&str, &str)],
        timeout: Duration,
        max_message: usize,
        tls: &Connector,
    ) -> Result<ServerConn, PoolError> {
        let work = async {
            let stream = TcpStream::connect((addr.host.as_str(), addr.port))
                .await
                .map_err(|source| PoolError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
            stream.set_nodelay(true)?;
            let sock = socket2::SockRef::from(&stream);
            let _ = sock.set_keepalive(true);
            let sever = Arc::new(sock.try_clone()?);
            let stream = negotiate_tls(stream, &addr.host, tls).await?;
            Self::log_in(stream, Some(sever), id, addr.clone(), creds, startup, max_message).await
        };
        if timeout.is_zero() {
            return work.await;
        }
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| PoolError::ConnectTimeout(addr.to_string()))?
    }

    /// Logs in over a stream that is already open, such as the in-memory
    /// end of a test's fake server (`MaybeTls::Memory`; see the pool's
    /// `Connect`). No timeout: the caller sets its own. The connection
    /// has no socket for `Pool::retire` to cut.
    pub async fn over_stream(
        stream: ServerStream,
        id: u64,
        addr: Arc<NodeAddr>,
        creds: &ServerCredentials,
        startup: &[(&str, &str)],
        max_message: usize,
    ) -> Result<ServerConn, PoolError> {
        Self::log_in(stream, None, id, addr, creds, startup, max_message).await
    }

    /// The login both kinds of connection share.
    async fn log_in(
        stream: ServerStream,
        sever: Option<Arc<socket2::Socket>>,
        id: u64,
        addr: Arc<NodeAddr>,
        creds: &ServerCredentials,
        startup: &[(&str, &str)],
        max_message: usize,
    ) -> Result<ServerConn, PoolError> {
        let mut wire = Wire::new(stream, max_message);
        let r = login(&mut wire, creds, startup).await?;
        let now = Instant::now();
        Ok(ServerConn {
            wire,
            id,
            addr,
            backend_pid: r.backend_pid,
            backend_key: r.backend_key,
            params: r.params,
            settings: Vec::new(),
            fingerprint: None,
            statements: ServerStatements::default(),
            created: now,
            idle_since: now,
            uses: 0,
            sever,
            home: crate::affinity::current(),
        })
    }

    /// A reported parameter's current value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn set_param(&mut self, name: &str, value: &str) {
        if self.param(name) != Some(value) {
            set(&mut self.params, name, value);
            self.fingerprint = None;
        }
    }

    /// An unreported setting pgferry applied, if any.
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn settings(&self) -> &[(String, String)] {
        &self.settings
    }

    /// Records an unreported setting's value (None: back to its default).
    pub fn set_setting(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(v) => set(&mut self.settings, name, v),
            None => self.settings.retain(|(k, _)| k != name),
        }
        self.fingerprint = None;
    }

    pub fn replace_settings(&mut self, settings: Vec<(String, String)>) {
        self.settings = settings;
        self.fingerprint = None;
    }

    /// True if an idle connection has been closed by the server or has
    /// sent something unsolicited (a FATAL on shutdown): it must not be reused.
    ///
    /// The reactor's readiness is free to ask but only as fresh as its last
    /// turn, and a loop under load turns it less often (tokio polls it every
    /// 61 tasks): a backend whose postmaster was killed sends its FATAL
    /// right after its last ReadyForQuery, and a new session must not get
    /// that connection because the reactor had not looked yet. So a
    /// connection idle for longer than [`TRUST_REACTOR_FOR`] asks the
    /// kernel instead (one `recv(MSG_PEEK)`). Back-to-back reuse under load
    /// skips the syscall; what it can miss is a server that died in that
    /// last instant, which no check can tell from one that dies just after.
    pub fn is_stale(&mut self, now: Instant) -> bool {
        if !self.wire.rbuf.is_empty() {
            return true;
        }
        if now.saturating_duration_since(self.idle_since) < TRUST_REACTOR_FOR {
            return self.wire.rd.has_input();
        }
        // The kernel knows everything the reactor could about a plain
        // socket; over TLS, rustls may hold bytes it already read (and a
        // test's in-memory stream has no socket).
        if self.sever.is_some() && self.wire.wr.is_plain() {
            return self.socket_has_input();
        }
        self.wire.rd.has_input() || self.socket_has_input()
    }

    /// Whether the kernel holds input (or end of stream, or an error) for
    /// this connection's socket. Never waits: the socket is non-blocking.
    fn socket_has_input(&self) -> bool {
        let Some(sock) = &self.sever else {
            return false;
        };
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        !matches!(sock.peek(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Sends Terminate without waiting; used when closing a connection.
    pub fn terminate(&mut self) {
        let mut b = BytesMut::with_capacity(5);
        encode::terminate(&mut b);
        self.wire.wr.write_now(&b);
    }
}

/// SSLRequest and the TLS handshake, as the connector's mode asks.
pub async fn negotiate_tls(mut tcp: TcpStream, host: &str, tls: &Connector) -> Result<ServerStream, PoolError> {
    if !tls.wants_tls() {
        return Ok(MaybeTls::Plain(tcp));
    }
    let mut b = BytesMut::with_capacity(8);
    encode::ssl_request(&mut b);
    tcp.write_all(&b).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let s = tls
                .connect(host, tcp)
                .await
                .map_err(|e| PoolError::Tls(format!("TLS handshake with {host}: {e}")))?;
            Ok(MaybeTls::Tls(Box::new(s)))
        }
        b'N' if tls.plaintext_allowed() => Ok(MaybeTls::Plain(tcp)),
        b'N' => Err(PoolError::Tls(format!(
            "server {host} does not support TLS and server_tls = {:?}",
            tls.mode
        ))),
        _ => Err(PoolError::Tls(format!(
            "server {host} answered SSLRequest with garbage"
        ))),
    }
}

/// Sets `name` to `value` in a small name/value list.
pub fn set(list: &mut Vec<(String, String)>, name: &str, value: &str) {
    match list.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => {
            if v != value {
                v.clear();
                v.push_str(value);
            }
        }
        None => list.push((name.to_owned(), value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_protocol::backend::TxStatus;
    use pgferry_protocol::encode::Severity;
    use std::io::{Read, Write};

    /// A real TCP server that logs anyone in (trust) and then hands its
    /// socket back, so a test can make it speak or hang up at will.
    fn trust_server() -> (u16, std::sync::mpsc::Receiver<std::net::TcpStream>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                let mut len = [0u8; 4];
                s.read_exact(&mut len).unwrap();
                let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                s.read_exact(&mut startup).unwrap();
                let mut out = BytesMut::new();
                encode::auth_ok(&mut out);
                encode::backend_key_data(&mut out, 42, 7);
                encode::ready_for_query(&mut out, TxStatus::Idle);
                s.write_all(&out).unwrap();
                if tx.send(s).is_err() {
                    return;
                }
            }
        });
        (port, rx)
    }

    async fn connect(port: u16) -> ServerConn {
        let tls = Connector::new(&pgferry_config::Tls {
            server_tls: pgferry_config::ServerTls::Disable,
            ..Default::default()
        })
        .unwrap();
        let addr = Arc::new(NodeAddr {
            host: "127.0.0.1".into(),
            port,
        });
        let creds = ServerCredentials::new("u", None);
        ServerConn::connect(
            1,
            addr,
            &creds,
            &[("database", "d")],
            Duration::from_secs(5),
            1 << 20,
            &tls,
        )
        .await
        .unwrap()
    }

    /// The case the reactor alone gets wrong: the server said FATAL and
    /// left while this event loop was busy (it never turned its reactor
    /// since). A connection idle for longer than `TRUST_REACTOR_FOR` is
    /// still found stale, and a silent one is not.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_server_left_is_stale_before_the_reactor_knows() {
        let (port, sockets) = trust_server();
        let mut left = connect(port).await;
        let mut gone = sockets.recv().unwrap();
        let mut silent = connect(port).await;
        let _quiet = sockets.recv().unwrap();

        let mut fatal = BytesMut::new();
        encode::error_response(
            &mut fatal,
            Severity::Fatal,
            "57P01",
            "terminating connection due to unexpected postmaster exit",
        );
        gone.write_all(&fatal).unwrap();
        drop(gone);
        // Blocking on purpose: no await, so the reactor cannot turn.
        std::thread::sleep(Duration::from_millis(50));

        let later = left.idle_since + TRUST_REACTOR_FOR;
        assert!(left.is_stale(later), "FATAL and EOF are waiting in the socket");
        assert!(!silent.is_stale(silent.idle_since + TRUST_REACTOR_FOR));
        assert!(!silent.is_stale(silent.idle_since), "nothing to see either way");
    }
}
