//! The untagged startup phase: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest all begin with a 4-byte length and a 4-byte code.
//! Codes come from PostgreSQL's `src/include/libpq/pqcomm.h`.

use crate::frame::{ProtocolError, Reader};
use bytes::BytesMut;

/// `NEGOTIATE_SSL_CODE` = (1234 << 16) | 5679.
pub const SSL_REQUEST_CODE: u32 = 80877103;
/// `NEGOTIATE_GSS_CODE` = (1234 << 16) | 5680.
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
/// `CANCEL_REQUEST_CODE` = (1234 << 16) | 5678.
pub const CANCEL_REQUEST_CODE: u32 = 80877102;
/// `MAX_STARTUP_PACKET_LENGTH` in pqcomm.h.
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// First byte of a TLS ClientHello record: PostgreSQL 17's direct TLS.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// A decoded startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// StartupMessage. `minor` may be above 0; the proxy negotiates it down.
    Startup {
        major: u16,
        minor: u16,
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: u32,
        key: u32,
    },
}

impl StartupPacket {
    /// Value of a startup parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Decodes a startup-phase packet once it is complete.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_PACKET_LEN as u32).contains(&len) {
        return Err(ProtocolError::BadStartupLength(len));
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    let packet = buf.split_to(len as usize);
    let body = &packet[4..];
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST_CODE if rest.is_empty() => Ok(Some(StartupPacket::GssEncRequest)),
        CANCEL_REQUEST_CODE if rest.len() == 8 => {
            let pid = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let key = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
            Ok(Some(StartupPacket::Cancel { pid, key }))
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(ProtocolError::Malformed("startup request"))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedProtocol { major, minor });
            }
            let mut r = Reader::new(rest, "startup packet");
            let mut params = Vec::new();
            loop {
                let k = r.cstr_utf8()?;
                if k.is_empty() {
                    break;
                }
                let v = r.cstr_utf8()?;
                params.push((k.to_owned(), v.to_owned()));
            }
            if !r.is_empty() {
                return Err(ProtocolError::Malformed("startup packet"));
            }
            Ok(Some(StartupPacket::Startup { major, minor, params }))
        }
    }
}

/// Parses libpq's `options` startup parameter into `-c name=value` pairs.
/// Both `-c name=value` and `--name=value` are accepted, with backslash
/// escaping of spaces, as the server's `pg_split_opts` does.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or(ProtocolError::Malformed("options"))?
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_owned()
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_owned()
        } else {
            return Err(ProtocolError::Malformed("options"));
        };
        let (k, v) = setting.split_once('=').ok_or(ProtocolError::Malformed("options"))?;
        out.push((k.replace('-', "_"), v.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, rest: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&((rest.len() + 8) as u32).to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn startup_params() {
        let mut b = packet(196608, b"user\0bob\0database\0db\0\0");
        let p = decode_startup(&mut b).unwrap().unwrap();
        assert_eq!(p.param("user"), Some("bob"));
        assert_eq!(p.param("database"), Some("db"));
    }

    #[test]
    fn ssl_and_cancel() {
        assert_eq!(
            decode_startup(&mut packet(SSL_REQUEST_CODE, b"")).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        let mut rest = 7u32.to_be_bytes().to_vec();
        rest.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            decode_startup(&mut packet(CANCEL_REQUEST_CODE, &rest)).unwrap(),
            Some(StartupPacket::Cancel { pid: 7, key: 9 })
        );
    }

    #[test]
    fn rejects_oversized_and_garbage() {
        let mut b = BytesMut::from(&[0, 1, 0, 0, 0, 3, 0, 0][..]);
        assert!(decode_startup(&mut b).is_err());
        let mut b = packet(196608, b"user\0bob\0unterminated");
        assert!(decode_startup(&mut b).is_err());
        let mut b = packet(2 << 16, b"\0");
        assert!(matches!(
            decode_startup(&mut b),
            Err(ProtocolError::UnsupportedProtocol { .. })
        ));
    }

    #[test]
    fn options_parsing() {
        let o = parse_options("-c search_path=a\\ b --statement-timeout=5s -cwork_mem=64MB").unwrap();
        assert_eq!(
            o,
            vec![
                ("search_path".into(), "a b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into())
            ]
        );
        assert!(parse_options("-x").is_err());
    }
}
