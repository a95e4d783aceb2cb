//! Typed views of the server messages the proxy inspects.
//! Message formats: PostgreSQL docs, "Message Formats" (protocol-message-formats.html).

use crate::frame::{ProtocolError, Reader};

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const DATA_ROW: u8 = b'D';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const ERROR_RESPONSE: u8 = b'E';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const NO_DATA: u8 = b'n';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const PARAMETER_STATUS: u8 = b'S';
pub const PARSE_COMPLETE: u8 = b'1';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ROW_DESCRIPTION: u8 = b'T';

/// Transaction status reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InTransaction,
    /// 'E': in a failed transaction block.
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Result<Self, ProtocolError> {
        match b {
            b'I' => Ok(TxStatus::Idle),
            b'T' => Ok(TxStatus::InTransaction),
            b'E' => Ok(TxStatus::Failed),
            _ => Err(ProtocolError::Malformed("ReadyForQuery")),
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

pub fn ready_for_query(body: &[u8]) -> Result<TxStatus, ProtocolError> {
    match body {
        [b] => TxStatus::from_byte(*b),
        _ => Err(ProtocolError::Malformed("ReadyForQuery")),
    }
}

/// ParameterStatus: (name, value).
pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut r = Reader::new(body, "ParameterStatus");
    Ok((r.cstr_utf8()?, r.cstr_utf8()?))
}

/// BackendKeyData: (process id, secret key). Protocol 3.0 keys are 4 bytes.
pub fn backend_key_data(body: &[u8]) -> Result<(u32, u32), ProtocolError> {
    let mut r = Reader::new(body, "BackendKeyData");
    let pid = r.i32()? as u32;
    let key = r.i32()? as u32;
    Ok((pid, key))
}

/// CommandComplete's tag, e.g. `SELECT 1`, `COMMIT`, `ROLLBACK`.
pub fn command_complete(body: &[u8]) -> Result<&[u8], ProtocolError> {
    Reader::new(body, "CommandComplete").cstr()
}

/// Fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    /// 'V': the non-localized severity (ERROR, FATAL, PANIC).
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
}

pub fn error_fields(body: &[u8]) -> Result<ErrorFields<'_>, ProtocolError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut out = ErrorFields::default();
    let mut localized = "";
    loop {
        let t = r.u8()?;
        if t == 0 {
            break;
        }
        let v = std::str::from_utf8(r.cstr()?).unwrap_or("");
        match t {
            b'V' => out.severity = v,
            b'S' => localized = v,
            b'C' => out.code = v,
            b'M' => out.message = v,
            _ => {}
        }
    }
    if out.severity.is_empty() {
        out.severity = localized;
    }
    Ok(out)
}

/// Authentication request codes (the first int32 of an 'R' message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    Ok,
    CleartextPassword,
    Md5Password { salt: [u8; 4] },
    Sasl { mechanisms: Vec<&'a str> },
    SaslContinue { data: &'a [u8] },
    SaslFinal { data: &'a [u8] },
    Other(i32),
}

pub fn authentication(body: &[u8]) -> Result<AuthRequest<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Authentication");
    Ok(match r.i32()? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::CleartextPassword,
        5 => {
            let s = r.bytes(4)?;
            AuthRequest::Md5Password {
                salt: [s[0], s[1], s[2], s[3]],
            }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr_utf8()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue { data: r.remaining() },
        12 => AuthRequest::SaslFinal { data: r.remaining() },
        n => AuthRequest::Other(n),
    })
}

/// True for messages a server may send at any time, not as a reply to a
/// particular request (protocol docs, "Asynchronous Operations").
pub fn is_async(tag: u8) -> bool {
    matches!(tag, NOTICE_RESPONSE | PARAMETER_STATUS | NOTIFICATION_RESPONSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields_prefer_nonlocalized_severity() {
        let body = b"SFEHLER\0VERROR\0C42P01\0Mrelation does not exist\0\0";
        let f = error_fields(body).unwrap();
        assert_eq!(f.severity, "ERROR");
        assert_eq!(f.code, "42P01");
        assert_eq!(f.message, "relation does not exist");
    }

    #[test]
    fn rfq() {
        assert_eq!(ready_for_query(b"T").unwrap(), TxStatus::InTransaction);
        assert!(ready_for_query(b"X").is_err());
        assert!(ready_for_query(b"").is_err());
    }
}
