//! A TCP socket that may carry TLS, and its read and write halves.
//!
//! Plain sockets split into tokio's owned halves (no lock, and the session
//! can use `try_read` on them to keep idle clients' buffers small); TLS
//! streams split through `tokio::io::split`, as one TLS state serves both
//! directions.
//!
//! A third kind, an in-memory pipe, lets tests put a fake server behind a
//! real connection. It is its own variant rather than a boxed stream, so
//! that real sockets pay no dynamic dispatch on reads and writes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A client's socket on a listener.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
/// A socket to a PostgreSQL server.
pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    /// One end of `tokio::io::duplex` (tests: a fake peer on the other).
    Memory(DuplexStream),
    /// Left behind while the socket is being upgraded to TLS.
    Closed,
}

pub enum ReadHalf<T> {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<T>),
    Memory(tokio::io::ReadHalf<DuplexStream>),
}

pub enum WriteHalf<T> {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<T>),
    Memory(tokio::io::WriteHalf<DuplexStream>),
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket is being upgraded to TLS")
}

impl<T: AsyncRead + AsyncWrite + Unpin> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    pub fn split(self) -> (ReadHalf<T>, WriteHalf<T>) {
        match self {
            MaybeTls::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            MaybeTls::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
            MaybeTls::Memory(s) => {
                let (r, w) = tokio::io::split(s);
                (ReadHalf::Memory(r), WriteHalf::Memory(w))
            }
            MaybeTls::Closed => unreachable!("a closed stream is never split"),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Memory(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Memory(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Memory(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Memory(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl<T: AsyncRead + Unpin> ReadHalf<T> {
    /// True if the peer has sent something or closed: for an idle server
    /// connection, either makes it unusable. Never waits.
    pub fn has_input(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            ReadHalf::Plain(r) => {
                // The reactor's readiness first: when it says not readable
                // (the usual case for an idle connection), no syscall.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let readable = std::pin::pin!(r.readable());
                if readable.poll(&mut cx).is_pending() {
                    return false;
                }
                !matches!(r.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            ReadHalf::Tls(r) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                !Pin::new(r).poll_read(&mut cx, &mut buf).is_pending()
            }
            ReadHalf::Memory(r) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                !Pin::new(r).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

impl<T: AsyncRead> AsyncRead for ReadHalf<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tls(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Memory(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite> WriteHalf<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, WriteHalf::Tls(_))
    }

    /// A plain TCP socket (not TLS, not an in-memory test pipe).
    pub fn is_plain(&self) -> bool {
        matches!(self, WriteHalf::Plain(_))
    }

    /// Writes what the socket takes right now, without waiting (used for
    /// a parting Terminate). Over TLS this may queue the record only.
    pub fn write_now(&mut self, b: &[u8]) {
        match self {
            WriteHalf::Plain(w) => {
                let _ = w.try_write(b);
            }
            WriteHalf::Tls(w) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _ = Pin::new(&mut *w).poll_write(&mut cx, b);
                let _ = Pin::new(w).poll_flush(&mut cx);
            }
            WriteHalf::Memory(w) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _ = Pin::new(w).poll_write(&mut cx, b);
            }
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for WriteHalf<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Tls(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Memory(w) => Pin::new(w).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Memory(w) => Pin::new(w).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Memory(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteHalf::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteHalf::Memory(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Plain(w) => w.is_write_vectored(),
            WriteHalf::Tls(w) => w.is_write_vectored(),
            WriteHalf::Memory(w) => w.is_write_vectored(),
        }
    }
}

/// A plain socket's halves joined and taken out of tokio's reactor (a
/// parked client waits in an epoll set of its own). Only plain sockets can
/// be parked: a TLS stream's state lives in the stream.
pub fn into_std<T>(r: ReadHalf<T>, w: WriteHalf<T>) -> io::Result<std::net::TcpStream> {
    match (r, w) {
        (ReadHalf::Plain(r), WriteHalf::Plain(w)) => r.reunite(w).map_err(io::Error::other)?.into_std(),
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "only plain sockets can be parked",
        )),
    }
}

/// The halves of a socket [`into_std`] took out, registered with the
/// current runtime's reactor again.
pub fn from_std<T>(s: std::net::TcpStream) -> io::Result<(ReadHalf<T>, WriteHalf<T>)> {
    let (r, w) = TcpStream::from_std(s)?.into_split();
    Ok((ReadHalf::Plain(r), WriteHalf::Plain(w)))
}

/// Read half of a client's socket.
pub type ClientReadHalf = ReadHalf<tokio_rustls::server::TlsStream<TcpStream>>;
/// Write half of a client's socket.
pub type ClientWriteHalf = WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>;
/// Read half of a server socket.
pub type ServerReadHalf = ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>;
/// Write half of a server socket.
pub type ServerWriteHalf = WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS handshake accepted on a listener.
pub async fn accept(
    config: std::sync::Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
}

/// ALPN protocol and whether a client certificate was presented.
pub fn session_info(s: &tokio_rustls::server::TlsStream<TcpStream>) -> (Option<Vec<u8>>, bool) {
    let (_, conn) = s.get_ref();
    (
        conn.alpn_protocol().map(|p| p.to_vec()),
        conn.peer_certificates().is_some_and(|c| !c.is_empty()),
    )
}

/// "TLSv1_3/TLS13_AES_256_GCM_SHA384": version and cipher suite, for the
/// admin console.
pub fn describe(s: &tokio_rustls::server::TlsStream<TcpStream>) -> String {
    let (_, conn) = s.get_ref();
    let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
    let suite = conn
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_default();
    format!("{version}/{suite}")
}
