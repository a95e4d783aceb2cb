//! Encoders. Each appends one message to a caller-owned buffer, so a batch of
//! messages costs no allocation once the buffer has grown.

use crate::backend::TxStatus;
use bytes::{BufMut, BytesMut};

/// Appends a message with `tag`, letting `body` write the body, then patches
/// in the length.
#[inline]
pub fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

// ---- server → client ----

/// Severity for [`error_response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message_text: &str) {
    error_response_detail(buf, severity, code, message_text, None);
}

pub fn error_response_detail(
    buf: &mut BytesMut,
    severity: Severity,
    code: &str,
    message_text: &str,
    hint: Option<&str>,
) {
    message(buf, b'E', |b| {
        b.put_u8(b'S');
        cstr(b, severity.as_str().as_bytes());
        b.put_u8(b'V');
        cstr(b, severity.as_str().as_bytes());
        b.put_u8(b'C');
        cstr(b, code.as_bytes());
        b.put_u8(b'M');
        cstr(b, message_text.as_bytes());
        if let Some(h) = hint {
            b.put_u8(b'H');
            cstr(b, h.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn notice_response(buf: &mut BytesMut, code: &str, message_text: &str) {
    message(buf, b'N', |b| {
        for (t, v) in [(b'S', "NOTICE"), (b'V', "NOTICE"), (b'C', code), (b'M', message_text)] {
            b.put_u8(t);
            cstr(b, v.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    message(buf, b'Z', |b| b.put_u8(status.as_byte()));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        cstr(b, name.as_bytes());
        cstr(b, value.as_bytes());
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: u32, key: u32) {
    message(buf, b'K', |b| {
        b.put_u32(pid);
        b.put_u32(key);
    });
}

pub fn auth_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(3));
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

/// NegotiateProtocolVersion: the newest minor version we support (0) and the
/// `_pq_.` options we did not recognise.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: u32, unrecognized: &[&str]) {
    message(buf, b'v', |b| {
        b.put_u32((3 << 16) | minor);
        b.put_u32(unrecognized.len() as u32);
        for o in unrecognized {
            cstr(b, o.as_bytes());
        }
    });
}

pub fn parse_complete(buf: &mut BytesMut) {
    message(buf, b'1', |_| {});
}

pub fn close_complete(buf: &mut BytesMut) {
    message(buf, b'3', |_| {});
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| cstr(b, tag.as_bytes()));
}

pub fn empty_query_response(buf: &mut BytesMut) {
    message(buf, b'I', |_| {});
}

/// RowDescription for text columns (used by the admin console).
pub fn row_description_text(buf: &mut BytesMut, columns: &[&str]) {
    message(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for c in columns {
            cstr(b, c.as_bytes());
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
}

pub fn data_row_text(buf: &mut BytesMut, values: &[Option<&str>]) {
    message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(s) => {
                    b.put_i32(s.len() as i32);
                    b.put_slice(s.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

// ---- client → server ----

pub fn startup_message(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_u32(0);
    buf.put_u32(3 << 16);
    for (k, v) in params {
        cstr(buf, k.as_bytes());
        cstr(buf, v.as_bytes());
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn ssl_request(buf: &mut BytesMut) {
    buf.put_u32(8);
    buf.put_u32(crate::startup::SSL_REQUEST_CODE);
}

pub fn cancel_request(buf: &mut BytesMut, pid: u32, key: u32) {
    buf.put_u32(16);
    buf.put_u32(crate::startup::CANCEL_REQUEST_CODE);
    buf.put_u32(pid);
    buf.put_u32(key);
}

pub fn query(buf: &mut BytesMut, sql: &[u8]) {
    message(buf, b'Q', |b| cstr(b, sql));
}

pub fn parse(buf: &mut BytesMut, name: &[u8], sql: &[u8], param_types: &[u8]) {
    message(buf, b'P', |b| {
        cstr(b, name);
        cstr(b, sql);
        b.put_slice(param_types);
    });
}

/// Bind with a rewritten statement name; `rest` is the original body after
/// the statement name (formats, values, result formats).
pub fn bind(buf: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    message(buf, b'B', |b| {
        cstr(b, portal);
        cstr(b, statement);
        b.put_slice(rest);
    });
}

pub fn describe(buf: &mut BytesMut, kind: u8, name: &[u8]) {
    message(buf, b'D', |b| {
        b.put_u8(kind);
        cstr(b, name);
    });
}

pub fn close(buf: &mut BytesMut, kind: u8, name: &[u8]) {
    message(buf, b'C', |b| {
        b.put_u8(kind);
        cstr(b, name);
    });
}

/// Execute `portal`, returning at most `max_rows` rows (0 = all).
pub fn execute(buf: &mut BytesMut, portal: &[u8], max_rows: i32) {
    message(buf, b'E', |b| {
        cstr(b, portal);
        b.put_i32(max_rows);
    });
}

pub fn sync(buf: &mut BytesMut) {
    message(buf, b'S', |_| {});
}

pub fn terminate(buf: &mut BytesMut) {
    message(buf, b'X', |_| {});
}

pub fn password(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'p', |b| b.put_slice(data));
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(buf, b'p', |b| {
        cstr(b, mechanism.as_bytes());
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

/// Quotes a string as an SQL literal that is valid whatever
/// `standard_conforming_strings` is: `E'...'` with `'` and `\` doubled.
pub fn sql_literal(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(b"E'");
    for &c in s {
        if c == b'\'' || c == b'\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push(b'\'');
}

/// `n` in decimal, written into `buf` without allocating (SCRAM's
/// iteration count, the load generator's keys).
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_frame;

    #[test]
    fn error_round_trip() {
        let mut b = BytesMut::new();
        error_response(&mut b, Severity::Fatal, "08P01", "bad");
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        let e = crate::backend::error_fields(f.body()).unwrap();
        assert_eq!((e.severity, e.code, e.message), ("FATAL", "08P01", "bad"));
    }

    #[test]
    fn literal_quoting() {
        let mut v = Vec::new();
        sql_literal(&mut v, b"a'b\\c");
        assert_eq!(v, b"E'a''b\\\\c'");
    }
}
