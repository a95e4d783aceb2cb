//! Typed views of the client messages the proxy inspects.

use crate::frame::{ProtocolError, Reader};

pub const BIND: u8 = b'B';
pub const CLOSE: u8 = b'C';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const PARSE: u8 = b'P';
pub const PASSWORD: u8 = b'p';
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';

/// True for every message type a client may send after authentication.
pub fn is_known(tag: u8) -> bool {
    matches!(
        tag,
        BIND | CLOSE
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | DESCRIBE
            | EXECUTE
            | FLUSH
            | FUNCTION_CALL
            | PARSE
            | QUERY
            | SYNC
            | TERMINATE
    )
}

/// Query: the SQL text, without the terminator.
pub fn query(body: &[u8]) -> Result<&[u8], ProtocolError> {
    Reader::new(body, "Query").cstr()
}

/// Parse: statement name, query text, and the raw parameter-type section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Count (int16) and OIDs, kept raw: they are part of a statement's identity.
    pub param_types: &'a [u8],
}

pub fn parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Parse");
    let name = r.cstr()?;
    let query = r.cstr()?;
    let param_types = r.remaining();
    let mut check = Reader::new(param_types, "Parse");
    // Unsigned, as PostgreSQL reads it: up to 65,535 parameter types.
    let n = check.u16()?;
    if check.remaining().len() != n as usize * 4 {
        return Err(ProtocolError::Malformed("Parse"));
    }
    Ok(Parse {
        name,
        query,
        param_types,
    })
}

/// Bind: portal and statement names, and the offset in the body where the
/// rest (formats, parameters, result formats) starts, so the statement name
/// can be rewritten without touching the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub rest_offset: usize,
}

pub fn bind(body: &[u8]) -> Result<Bind<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let rest_offset = body.len() - r.remaining().len();
    Ok(Bind {
        portal,
        statement,
        rest_offset,
    })
}

/// A Bind's parameter formats and values (None: NULL), read from the rest
/// after the names ([`Bind::rest_offset`]). Only what shard routing needs;
/// allocation-free: the caller keeps the vectors.
pub fn bind_params<'a>(
    rest: &'a [u8],
    formats: &mut Vec<i16>,
    values: &mut Vec<Option<&'a [u8]>>,
) -> Result<(), ProtocolError> {
    formats.clear();
    values.clear();
    let mut r = Reader::new(rest, "Bind");
    let nf = r.u16()?;
    for _ in 0..nf {
        formats.push(r.i16()?);
    }
    let nv = r.u16()?;
    for _ in 0..nv {
        let len = r.i32()?;
        values.push(if len < 0 { None } else { Some(r.bytes(len as usize)?) });
    }
    Ok(())
}

/// [`bind_params`] into a caller's array: the number of values, or an
/// error when the Bind is malformed. More values than `values` holds: all
/// formats are read and the count returned is `values.len() + 1`, so the
/// caller can tell and fall back to [`bind_params`].
pub fn bind_params_into<'a>(
    rest: &'a [u8],
    formats: &mut Vec<i16>,
    values: &mut [Option<&'a [u8]>],
) -> Result<usize, ProtocolError> {
    formats.clear();
    let mut r = Reader::new(rest, "Bind");
    let nf = r.u16()?;
    for _ in 0..nf {
        formats.push(r.i16()?);
    }
    let nv = r.u16()? as usize;
    if nv > values.len() {
        return Ok(values.len() + 1);
    }
    for v in values.iter_mut().take(nv) {
        let len = r.i32()?;
        *v = if len < 0 { None } else { Some(r.bytes(len as usize)?) };
    }
    Ok(nv)
}

/// A Parse's declared parameter types (0: inferred).
pub fn param_types(raw: &[u8]) -> impl Iterator<Item = u32> + '_ {
    raw.get(2..)
        .unwrap_or_default()
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

/// Describe and Close: kind ('S' statement or 'P' portal) and name.
pub fn target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a [u8]), ProtocolError> {
    let mut r = Reader::new(body, what);
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed(what));
    }
    let name = r.cstr()?;
    if !r.is_empty() {
        return Err(ProtocolError::Malformed(what));
    }
    Ok((kind, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_view() {
        let p = parse(b"s1\0select $1\0\x00\x01\x00\x00\x00\x17").unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"select $1");
        assert!(parse(b"s1\0select $1\0\x00\x02\x00\x00\x00\x17").is_err());
    }

    #[test]
    fn parse_takes_up_to_65535_parameter_types() {
        for n in [32_767u16, 32_768, 40_000, 65_535] {
            let mut body = b"s\0insert\0".to_vec();
            body.extend_from_slice(&n.to_be_bytes());
            body.extend(std::iter::repeat_n([0, 0, 0, 23], n as usize).flatten());
            let p = parse(&body).unwrap_or_else(|e| panic!("{n} types: {e}"));
            assert_eq!(p.param_types.len(), 2 + 4 * n as usize);
            // One type missing is still malformed.
            assert!(parse(&body[..body.len() - 4]).is_err(), "{n}");
        }
    }

    #[test]
    fn bind_view() {
        let b = bind(b"\0s1\0\x00\x00\x00\x00\x00\x00").unwrap();
        assert_eq!(b.statement, b"s1");
        assert_eq!(b.rest_offset, 4);
    }
}

#[cfg(test)]
mod bind_params_tests {
    use super::*;

    #[test]
    fn reads_formats_and_values() {
        // portal "", statement "s1", 1 format (binary), 2 values (8 bytes,
        // NULL), 0 result formats.
        let mut body = b"\0s1\0".to_vec();
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2u16.to_be_bytes());
        body.extend_from_slice(&8i32.to_be_bytes());
        body.extend_from_slice(&42i64.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
        let b = bind(&body).unwrap();
        let (mut f, mut v) = (Vec::new(), Vec::new());
        bind_params(&body[b.rest_offset..], &mut f, &mut v).unwrap();
        assert_eq!(f, vec![1]);
        assert_eq!(v, vec![Some(&42i64.to_be_bytes()[..]), None]);
        // Truncated: an error, not a panic.
        for cut in 0..body.len() - b.rest_offset - 2 {
            let r = bind_params(&body[b.rest_offset..b.rest_offset + cut], &mut f, &mut v);
            assert!(r.is_err(), "cut at {cut}");
        }
        let types = [0u8, 2, 0, 0, 0, 20, 0, 0, 0, 0];
        assert_eq!(param_types(&types).collect::<Vec<_>>(), vec![20, 0]);

        // Into an array: the same values, the same errors.
        let mut a = [None; 4];
        assert_eq!(bind_params_into(&body[b.rest_offset..], &mut f, &mut a).unwrap(), 2);
        assert_eq!(f, vec![1]);
        assert_eq!(a[..2], [Some(&42i64.to_be_bytes()[..]), None]);
        for cut in 0..body.len() - b.rest_offset - 2 {
            let r = bind_params_into(&body[b.rest_offset..b.rest_offset + cut], &mut f, &mut a);
            assert!(r.is_err(), "cut at {cut}");
        }
        // More values than the array holds: says so.
        let mut one = [None; 1];
        assert_eq!(bind_params_into(&body[b.rest_offset..], &mut f, &mut one).unwrap(), 2);
    }
}
