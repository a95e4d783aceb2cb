//! A minimal PostgreSQL protocol client: optional TLS (SSLRequest), startup
//! and authentication (trust, cleartext, md5, SCRAM-SHA-256), then
//! request/response exchanges that end at ReadyForQuery.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use pgferry_protocol::backend::{self, TxStatus};
use pgferry_protocol::encode;
use pgferry_protocol::frame::{self, decode_frame};
use pgferry_protocol::login::{ClientLogin, Step};
use pgferry_protocol::scram::{self, ScramKeys};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::tls;

/// Largest server message accepted.
const MAX_MESSAGE: usize = 64 << 20;
/// Spare room kept in the read buffer before each read.
const READ_CHUNK: usize = 4096;

/// One PBKDF2 result per (salt, iterations), computed by the first caller.
type ScramKeyCache = Mutex<HashMap<(Vec<u8>, u32), Arc<OnceCell<ScramKeys>>>>;

/// Everything needed to open connections to one server.
pub struct ConnParams {
    pub addr: SocketAddr,
    pub user: String,
    pub password: String,
    /// The StartupMessage, encoded once.
    startup: Vec<u8>,
    pub connect_timeout: Duration,
    /// Set for a TLS target: every connection sends SSLRequest and
    /// handshakes before the StartupMessage.
    tls: Option<TlsConnector>,
    /// PBKDF2 results per (salt, iterations): the password's keys are derived
    /// once, not once per connection, so connection storms stay cheap for
    /// the generator (the server still does its full share of the work).
    scram_keys: ScramKeyCache,
}

impl ConnParams {
    pub fn new(
        addr: SocketAddr,
        user: &str,
        password: &str,
        dbname: &str,
        connect_timeout: Duration,
        tls: Option<TlsConnector>,
    ) -> Arc<Self> {
        let mut startup = BytesMut::new();
        encode::startup_message(
            &mut startup,
            &[
                ("user", user),
                ("database", dbname),
                ("application_name", "pgferry-loadtest"),
            ],
        );
        Arc::new(ConnParams {
            addr,
            user: user.to_owned(),
            password: password.to_owned(),
            startup: startup.to_vec(),
            connect_timeout,
            tls,
            scram_keys: Mutex::new(HashMap::new()),
        })
    }

    async fn scram_keys(&self, salt: Vec<u8>, iterations: u32) -> Result<ScramKeys> {
        let cell = {
            let mut map = self.scram_keys.lock().unwrap_or_else(|e| e.into_inner());
            map.entry((salt.clone(), iterations)).or_default().clone()
        };
        let keys = cell
            .get_or_try_init(|| async {
                let password = self.password.clone();
                tokio::task::spawn_blocking(move || scram::keys_from_password(&password, &salt, iterations))
                    .await
                    .context("PBKDF2 task failed")
            })
            .await?;
        Ok(*keys)
    }
}

/// What the server answered to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The transaction status of the closing ReadyForQuery.
    pub status: TxStatus,
    /// Whether an ErrorResponse came before it (see [`Conn::last_error`]).
    pub error: bool,
}

/// A plain or TLS socket. Plain sockets go straight to tokio; the match per
/// poll is all the plain path pays for TLS support.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// Writes all of `buf`; over TLS also flushes the records rustls holds.
    async fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(buf).await,
            Stream::Tls(s) => {
                s.write_all(buf).await?;
                s.flush().await
            }
        }
    }
}

pub struct Conn {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    last_error: String,
}

impl Conn {
    /// Connects and authenticates, within the connect timeout.
    pub async fn connect(params: &ConnParams) -> Result<Conn> {
        tokio::time::timeout(params.connect_timeout, Self::connect_inner(params))
            .await
            .map_err(|_| anyhow!("connect timeout ({:?}) to {}", params.connect_timeout, params.addr))?
    }

    async fn connect_inner(params: &ConnParams) -> Result<Conn> {
        let mut tcp = TcpStream::connect(params.addr)
            .await
            .with_context(|| format!("connect to {}", params.addr))?;
        tcp.set_nodelay(true)?;
        let stream = match &params.tls {
            None => Stream::Plain(tcp),
            Some(connector) => {
                let mut req = BytesMut::new();
                encode::ssl_request(&mut req);
                tcp.write_all(&req).await?;
                let answer = tcp.read_u8().await.context("reading the answer to SSLRequest")?;
                tls::check_ssl_answer(answer)?;
                let name = ServerName::IpAddress(params.addr.ip().into());
                let s = connector.connect(name, tcp).await.context("TLS handshake")?;
                Stream::Tls(Box::new(s))
            }
        };
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::new(),
            last_error: String::new(),
        };
        conn.stream.send(&params.startup).await?;
        conn.log_in(params).await?;
        conn.wbuf = BytesMut::new();
        Ok(conn)
    }

    /// Startup's answer: authentication, then ParameterStatus,
    /// BackendKeyData and notices up to the first ReadyForQuery.
    async fn log_in(&mut self, params: &ConnParams) -> Result<()> {
        let mut login = ClientLogin::new(&params.user, Some(&params.password));
        loop {
            let f = self.read_frame().await?;
            self.wbuf.clear();
            match login.feed(&f, &mut self.wbuf)? {
                Step::Send => {}
                Step::ScramKeys { salt, iterations } => {
                    let keys = params.scram_keys(salt, iterations).await?;
                    login.scram_keys(&keys, &mut self.wbuf)?;
                }
                Step::Parameter { .. } | Step::BackendKey { .. } | Step::Read => continue,
                Step::Ready => return Ok(()),
            }
            self.stream.send(&self.wbuf).await?;
        }
    }

    /// Reads one whole message (handshake path; allocation per message is fine there).
    async fn read_frame(&mut self) -> Result<frame::Frame> {
        loop {
            if let Some(f) = decode_frame(&mut self.rbuf, MAX_MESSAGE)? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<()> {
        self.rbuf.reserve(READ_CHUNK);
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("server closed the connection");
        }
        Ok(())
    }

    /// Sends pre-encoded request bytes and reads up to ReadyForQuery. The hot
    /// path: one write, reads into a reused buffer, no per-message allocation.
    pub async fn exchange(&mut self, request: &[u8]) -> Result<Reply> {
        self.stream.send(request).await?;
        let mut error = false;
        loop {
            while let Some((tag, total)) = frame::peek_header(&self.rbuf, MAX_MESSAGE)? {
                if self.rbuf.len() < total {
                    break;
                }
                let body = &self.rbuf[frame::HEADER_LEN..total];
                match tag {
                    backend::ERROR_RESPONSE if !error => {
                        error = true;
                        self.last_error.clear();
                        self.last_error.push_str(&format_error(body));
                    }
                    backend::READY_FOR_QUERY => {
                        let status = backend::ready_for_query(body)?;
                        self.rbuf.advance(total);
                        return Ok(Reply { status, error });
                    }
                    _ => {}
                }
                self.rbuf.advance(total);
            }
            self.fill().await?;
        }
    }

    /// Runs one simple query and returns the first column of its first row.
    pub async fn query_scalar(&mut self, sql: &str) -> Result<Option<String>> {
        let mut req = BytesMut::new();
        encode::query(&mut req, sql.as_bytes());
        self.stream.send(&req).await?;
        let mut value = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                backend::DATA_ROW if value.is_none() => {
                    let body = f.body();
                    if body.len() >= 6 {
                        let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                        if len >= 0 && body.len() >= 6 + len as usize {
                            value = Some(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
                        }
                    }
                }
                backend::ERROR_RESPONSE => bail!("{sql}: {}", format_error(f.body())),
                backend::READY_FOR_QUERY => return Ok(value),
                _ => {}
            }
        }
    }

    /// The negotiated TLS parameters, or None on a plain connection.
    pub fn tls_description(&self) -> Option<String> {
        match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(s) => Some(tls::describe(s.get_ref().1)),
        }
    }

    /// The text of the first ErrorResponse of the last failed exchange.
    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    /// Sends Terminate and closes.
    pub async fn terminate(mut self) {
        let mut buf = BytesMut::new();
        encode::terminate(&mut buf);
        let _ = self.stream.send(&buf).await;
        let _ = self.stream.shutdown().await;
    }
}

/// "SEVERITY CODE message" for an ErrorResponse body.
pub fn format_error(body: &[u8]) -> String {
    match backend::error_fields(body) {
        Ok(e) => format!("{} {} {}", e.severity, e.code, e.message),
        Err(_) => "malformed ErrorResponse".to_owned(),
    }
}
