//! Framing of regular (tagged) messages: one tag byte, a 4-byte big-endian
//! length that counts itself, then the body.

use bytes::{Buf, Bytes, BytesMut};

/// Errors raised while decoding. Each maps to a clean close with SQLSTATE
/// 08P01 at the proxy boundary.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message length {0} is below the minimum of 4")]
    LengthTooSmall(u32),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("startup packet length {0} is invalid")]
    BadStartupLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    #[error("unexpected message type {0:?}")]
    UnexpectedTag(char),
    #[error(transparent)]
    Unmatched(#[from] crate::replies::MatchError),
    #[error("connection closed in the middle of a message")]
    Truncated,
}

/// One complete protocol message, holding its original bytes (tag, length
/// and body) so that it can be forwarded untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    /// The message body, after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= 5
    }
}

/// Header size: tag + length.
pub const HEADER_LEN: usize = 5;

/// Most capacity [`decode_frame`] reserves ahead of bytes that have not
/// arrived yet.
pub const GROW_STEP: usize = 64 * 1024;

/// Peeks at the next message header without consuming anything.
/// Returns `(tag, total length including the tag)` once the header is there.
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::LengthTooSmall(len));
    }
    let total = len as usize + 1;
    if total > max_len {
        return Err(ProtocolError::TooLarge {
            len: total,
            max: max_len,
        });
    }
    Ok(Some((tag, total)))
}

/// Decodes one message from the front of `buf` if it is complete.
///
/// `max_len` bounds the declared length *before* anything is buffered for
/// it. Within that bound the declared length is still only a claim: when
/// the header is complete but the body is not, at most [`GROW_STEP`] more
/// capacity is reserved, so the buffer grows with the bytes that actually
/// arrive (a 5-byte header cannot make the caller hold `max_len` bytes),
/// and large messages still read in big steps (the buffer's growth doubles).
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some((tag, total)) = peek_header(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve((total - buf.len()).min(GROW_STEP));
        return Ok(None);
    }
    let bytes = buf.split_to(total).freeze();
    Ok(Some(Frame { tag, bytes }))
}

/// [`decode_frame`] for a buffer that is refilled from empty (a client's
/// requests): when `buf` holds exactly one whole message, the message takes
/// the buffer itself instead of a split of it, which would allocate the
/// shared header that `split_to` needs. `buf` is left empty, without
/// capacity.
pub fn decode_frame_take(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    match peek_header(buf, max_len)? {
        Some((tag, total)) if total == buf.len() => Ok(Some(Frame {
            tag,
            bytes: std::mem::take(buf).freeze(),
        })),
        _ => decode_frame(buf, max_len),
    }
}

/// A cursor over a message body with the few readers the protocol needs.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn malformed(&self) -> ProtocolError {
        ProtocolError::Malformed(self.what)
    }

    /// A NUL-terminated string, returned without its terminator.
    pub fn cstr(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or_else(|| self.malformed())?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn cstr_utf8(&mut self) -> Result<&'a str, ProtocolError> {
        let what = self.what;
        std::str::from_utf8(self.cstr()?).map_err(|_| ProtocolError::Utf8(what))
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        if self.buf.is_empty() {
            return Err(self.malformed());
        }
        let v = self.buf[0];
        self.buf = &self.buf[1..];
        Ok(v)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        if self.buf.len() < 2 {
            return Err(self.malformed());
        }
        let v = (&self.buf[..2]).get_i16();
        self.buf = &self.buf[2..];
        Ok(v)
    }

    pub fn u16(&mut self) -> Result<u16, ProtocolError> {
        if self.buf.len() < 2 {
            return Err(self.malformed());
        }
        let v = (&self.buf[..2]).get_u16();
        self.buf = &self.buf[2..];
        Ok(v)
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        if self.buf.len() < 4 {
            return Err(self.malformed());
        }
        let v = (&self.buf[..4]).get_i32();
        self.buf = &self.buf[4..];
        Ok(v)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.malformed());
        }
        let v = &self.buf[..n];
        self.buf = &self.buf[n..];
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn decode_frame_take_takes_a_lone_message_and_splits_otherwise() {
        // One whole message: it takes the buffer, which is left empty.
        let one = msg(b'Q', b"SELECT 1\0");
        let mut b = BytesMut::from(&one[..]);
        let f = decode_frame_take(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!((f.tag, &f.bytes[..]), (b'Q', &one[..]));
        assert_eq!((b.len(), b.capacity()), (0, 0));
        // Two messages and a partial third: the same frames as decode_frame.
        let mut wire = msg(b'P', b"\0SELECT 2\0\0\0");
        wire.extend(msg(b'S', b""));
        wire.extend(&msg(b'Q', b"SELECT 3\0")[..4]);
        let (mut a, mut c) = (BytesMut::from(&wire[..]), BytesMut::from(&wire[..]));
        for _ in 0..3 {
            let x = decode_frame_take(&mut a, 1 << 20).unwrap().map(|f| (f.tag, f.bytes));
            let y = decode_frame(&mut c, 1 << 20).unwrap().map(|f| (f.tag, f.bytes));
            assert_eq!(x, y);
        }
        assert_eq!(a, c, "the partial message stays buffered");
        // Errors are decode_frame's.
        let mut bad = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            decode_frame_take(&mut bad, 1 << 20),
            Err(ProtocolError::LengthTooSmall(3))
        );
    }

    #[test]
    fn rejects_short_length() {
        let mut b = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(decode_frame(&mut b, 1 << 20), Err(ProtocolError::LengthTooSmall(3)));
    }

    #[test]
    fn rejects_oversized_before_buffering() {
        let mut b = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode_frame(&mut b, 1 << 20),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(b.capacity() < 1 << 20, "no reservation for a rejected length");
    }

    #[test]
    fn declared_length_is_not_reserved_up_front() {
        // A header declaring 200 MiB (within the limit) and 10 bytes of body.
        let max = 256 << 20;
        let mut b = BytesMut::new();
        b.extend_from_slice(b"Q");
        b.extend_from_slice(&(200u32 << 20).to_be_bytes());
        b.extend_from_slice(&[b'x'; 10]);
        assert_eq!(decode_frame(&mut b, max), Ok(None));
        assert!(b.capacity() <= 1 << 20, "reserved {} bytes", b.capacity());
        // The buffer grows as bytes arrive and the message still decodes.
        let body = vec![b'y'; (3 << 20) - 4];
        let mut b = BytesMut::new();
        b.extend_from_slice(&msg(b'Q', &body)[..5]);
        let mut f = None;
        for chunk in body.chunks(8192) {
            assert!(f.is_none());
            b.extend_from_slice(chunk);
            let before = b.len();
            f = decode_frame(&mut b, max).unwrap();
            if f.is_none() {
                assert!(
                    b.capacity() <= 2 * (before + GROW_STEP),
                    "capacity {} for {before}",
                    b.capacity()
                );
            }
        }
        assert_eq!(f.unwrap().body(), &body[..]);
    }

    proptest! {
        /// Splitting a stream at arbitrary points never changes what it decodes to.
        #[test]
        fn split_points_do_not_matter(
            msgs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)), 1..20),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut stream = Vec::new();
            for (t, b) in &msgs { stream.extend(msg(*t, b)); }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.push(stream.len());
            points.sort();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut prev = 0;
            for p in points {
                buf.extend_from_slice(&stream[prev..p]);
                prev = p;
                while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() { out.push(f); }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out.len(), msgs.len());
            for (f, (t, b)) in out.iter().zip(&msgs) {
                prop_assert_eq!(f.tag, *t);
                prop_assert_eq!(f.body(), &b[..]);
            }
        }

        /// Random bytes never panic the decoder, and it never buffers past the limit.
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_frame(&mut buf, 4096) {}
            prop_assert!(buf.capacity() <= 8192);
        }
    }
}
