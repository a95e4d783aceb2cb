//! PostgreSQL's hash functions for the types a Citus distribution column may
//! have, so a key maps to the shard Citus itself would pick.
//!
//! Interface:
//! - [`DistType::from_oid`]: the column's type OID, None when unsupported;
//! - [`hash_text`]: a value in text format (a literal, a text parameter);
//! - [`hash_binary`]: a value in binary format (a binary Bind parameter).
//!
//! Both return None whenever the value cannot be hashed with certainty
//! (the caller then routes to the coordinator, never guesses).
//!
//! What each type hashes with (PostgreSQL 15, the type's default hash
//! opclass, which is what Citus's `worker_hash` and shard pruning use):
//!
//! | type | function | text input accepted here |
//! |---|---|---|
//! | int2 / int4 / int8 | hashint2 / hashint4 / hashint8 | `int2in`/`int4in`/`int8in` exactly (whitespace, sign, decimal digits; out of range is None) |
//! | text, varchar | hashtext (bytes) | any valid UTF-8 without NUL |
//! | char(n) | hashbpchar (bytes without trailing spaces) | same |
//! | uuid | uuid_hash (16 bytes) | `uuid_in` spellings (braces, optional hyphens after each 4 hex digits, any case) |
//! | numeric | hash_numeric (base-10000 digits without leading/trailing zeros, xor weight; the sign is not hashed; 0 → -1, NaN/±Infinity → 0) | `numeric_in`: whitespace, sign, digits, point, exponent, NaN/Infinity/inf |
//! | date | hashint4 of days since 2000-01-01 | only ISO `YYYY-MM-DD` (DateStyle cannot change it), `infinity`, `-infinity`, `epoch` |
//! | timestamp | timestamp_hash = hashint8 of µs since 2000-01-01 | ISO `YYYY-MM-DD[( \|T)HH:MM[:SS[.f{1,6}]]]`, `infinity`, `-infinity`, `epoch`; anything with a zone is None |
//! | timestamptz | same | as timestamp but only with an explicit offset (`Z`, `±HH`, `±HHMM`, `±HH:MM`, `±HH:MM:SS`), since otherwise the session TimeZone decides; `infinity`/`-infinity` too |
//! | bool | hashchar (hash of 0 or 1) | `boolin` spellings |
//!
//! Assumptions, documented for the caller:
//! * text values are UTF-8 (server and client encoding UTF8); invalid UTF-8
//!   or a NUL byte gives None;
//! * text/varchar/char columns use a deterministic collation (with a
//!   non-deterministic one PostgreSQL hashes a sort key: do not call these);
//! * numeric columns have no typmod: with `numeric(p,s)` PostgreSQL rounds
//!   the value to `s` digits before storing it, which this function does not
//!   know about.

/// The supported distribution column types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DistType {
    Int2,
    Int4,
    Int8,
    /// text and varchar (hashtext over the bytes).
    Text,
    /// char(n): trailing spaces do not count.
    Bpchar,
    Uuid,
    Numeric,
    Date,
    Timestamp,
    Timestamptz,
    Bool,
}

impl DistType {
    pub fn from_oid(oid: u32) -> Option<DistType> {
        Some(match oid {
            21 => DistType::Int2,
            23 => DistType::Int4,
            20 => DistType::Int8,
            25 | 1043 => DistType::Text,
            1042 => DistType::Bpchar,
            2950 => DistType::Uuid,
            1700 => DistType::Numeric,
            1082 => DistType::Date,
            1114 => DistType::Timestamp,
            1184 => DistType::Timestamptz,
            16 => DistType::Bool,
            _ => return None,
        })
    }
}

/// Hashes a text-format value of type `ty` as PostgreSQL would after
/// converting it to that type.
pub fn hash_text(ty: DistType, value: &[u8]) -> Option<i32> {
    if value.contains(&0) {
        return None;
    }
    match ty {
        DistType::Int2 => parse_int(value, i64::from(i16::MIN), i64::from(i16::MAX)).map(|v| hashint4(v as i32)),
        DistType::Int4 => parse_int(value, i64::from(i32::MIN), i64::from(i32::MAX)).map(|v| hashint4(v as i32)),
        DistType::Int8 => parse_int(value, i64::MIN, i64::MAX).map(hashint8),
        DistType::Text => {
            std::str::from_utf8(value).ok()?;
            Some(hash_bytes(value) as i32)
        }
        DistType::Bpchar => {
            std::str::from_utf8(value).ok()?;
            Some(hashbpchar(value))
        }
        DistType::Uuid => parse_uuid(value).map(|u| hash_bytes(&u) as i32),
        DistType::Numeric => parse_numeric(value).map(|n| n.hash()),
        DistType::Date => parse_date_value(value).map(hashint4),
        DistType::Timestamp => parse_timestamp(value, false).map(hashint8),
        DistType::Timestamptz => parse_timestamp(value, true).map(hashint8),
        DistType::Bool => parse_bool(value).map(|b| hash_uint32(u32::from(b)) as i32),
    }
}

/// Hashes a binary-format value of type `ty`.
pub fn hash_binary(ty: DistType, value: &[u8]) -> Option<i32> {
    match ty {
        DistType::Int2 => Some(hashint4(i32::from(i16::from_be_bytes(value.try_into().ok()?)))),
        DistType::Int4 => Some(hashint4(i32::from_be_bytes(value.try_into().ok()?))),
        DistType::Int8 => Some(hashint8(i64::from_be_bytes(value.try_into().ok()?))),
        DistType::Text => {
            if value.contains(&0) {
                return None;
            }
            std::str::from_utf8(value).ok()?;
            Some(hash_bytes(value) as i32)
        }
        DistType::Bpchar => {
            if value.contains(&0) {
                return None;
            }
            std::str::from_utf8(value).ok()?;
            Some(hashbpchar(value))
        }
        DistType::Uuid => {
            let u: [u8; 16] = value.try_into().ok()?;
            Some(hash_bytes(&u) as i32)
        }
        DistType::Numeric => numeric_recv(value).map(|n| n.hash()),
        DistType::Date => {
            let d = i32::from_be_bytes(value.try_into().ok()?);
            // date_recv: finite dates must be in range.
            let valid = d == i32::MIN || d == i32::MAX || (DATE_MIN_DAYS..DATE_END_DAYS).contains(&d);
            valid.then(|| hashint4(d))
        }
        DistType::Timestamp | DistType::Timestamptz => {
            let t = i64::from_be_bytes(value.try_into().ok()?);
            let valid = t == i64::MIN || t == i64::MAX || (MIN_TIMESTAMP..END_TIMESTAMP).contains(&t);
            valid.then(|| hashint8(t))
        }
        DistType::Bool => match value {
            // boolrecv: any non-zero byte is true.
            [b] => Some(hash_uint32(u32::from(*b != 0)) as i32),
            _ => None,
        },
    }
}

// ---------------------------------------------------------------------------
// hash_bytes / hash_bytes_uint32 (src/common/hashfn.c, Bob Jenkins' lookup3)
// ---------------------------------------------------------------------------

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// PostgreSQL's `hash_bytes` (`hash_any`) on a little-endian machine, which
/// is what x86-64 and aarch64 servers compute.
pub fn hash_bytes(k: &[u8]) -> u32 {
    // keylen is an int in PostgreSQL; values here are far below 2^31.
    let init = 0x9e37_79b9_u32.wrapping_add(k.len() as u32).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    let word = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let mut rest = k;
    while rest.len() >= 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    // The last 0..=11 bytes, zero-padded, little-endian; the lowest byte of c
    // is not used (lookup3 reserves it for the length).
    let mut tail = [0u8; 12];
    tail[..rest.len()].copy_from_slice(rest);
    if !rest.is_empty() {
        a = a.wrapping_add(word(&tail[0..4]));
    }
    if rest.len() > 4 {
        b = b.wrapping_add(word(&tail[4..8]));
    }
    if rest.len() > 8 {
        c = c.wrapping_add(u32::from_le_bytes([0, tail[8], tail[9], tail[10]]));
    }
    final_mix(&mut a, &mut b, &mut c);
    c
}

/// PostgreSQL's `hash_bytes_uint32` (`hash_uint32`).
pub fn hash_uint32(k: u32) -> u32 {
    let init = 0x9e37_79b9_u32.wrapping_add(4).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    c
}

/// `hashint4` (also hashint2 after sign extension, hashchar, date).
pub fn hashint4(v: i32) -> i32 {
    hash_uint32(v as u32) as i32
}

/// `hashint8`: folds the high word into the low word so that values in the
/// int4 range hash as hashint4 does (also timestamp_hash).
pub fn hashint8(v: i64) -> i32 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = lo ^ if v >= 0 { hi } else { !hi };
    hash_uint32(folded) as i32
}

/// `hashbpchar`: trailing spaces do not count.
fn hashbpchar(v: &[u8]) -> i32 {
    let len = v.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    hash_bytes(&v[..len]) as i32
}

// ---------------------------------------------------------------------------
// Text input parsers
// ---------------------------------------------------------------------------

/// C `isspace` in the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn trim_space(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_space(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_space(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// `pg_strtoint16/32/64` of PostgreSQL 15: optional whitespace, an optional
/// sign, one or more decimal digits, optional whitespace. No underscores, no
/// hex/octal/binary prefixes (those came in PostgreSQL 16).
fn parse_int(s: &[u8], min: i64, max: i64) -> Option<i64> {
    let s = trim_space(s);
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Accumulate negatively so that the minimum value fits.
    let mut acc: i64 = 0;
    for &d in digits {
        acc = acc.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    let v = if neg { acc } else { acc.checked_neg()? };
    (min..=max).contains(&v).then_some(v)
}

/// `boolin` / `parse_bool_with_len`.
fn parse_bool(s: &[u8]) -> Option<bool> {
    let s = trim_space(s);
    let lower: Vec<u8> = s.to_ascii_lowercase();
    let is_prefix_of = |word: &[u8], min_len: usize| {
        !lower.is_empty() && lower.len() <= word.len() && lower.len() >= min_len && word.starts_with(&lower)
    };
    match lower.first()? {
        b't' if is_prefix_of(b"true", 1) => Some(true),
        b'f' if is_prefix_of(b"false", 1) => Some(false),
        b'y' if is_prefix_of(b"yes", 1) => Some(true),
        b'n' if is_prefix_of(b"no", 1) => Some(false),
        b'o' if is_prefix_of(b"on", 2) => Some(true),
        b'o' if is_prefix_of(b"off", 2) => Some(false),
        b'1' if lower.len() == 1 => Some(true),
        b'0' if lower.len() == 1 => Some(false),
        _ => None,
    }
}

/// `uuid_in` (`string_to_uuid`): optional braces, 32 hex digits, a hyphen
/// allowed after each group of four hex digits (not after the last), no
/// whitespace.
fn parse_uuid(s: &[u8]) -> Option<[u8; 16]> {
    let mut src = s;
    let braces = src.first() == Some(&b'{');
    if braces {
        src = &src[1..];
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        let [h, l, rest @ ..] = src else { return None };
        *byte = hex(*h)? << 4 | hex(*l)?;
        src = rest;
        if i % 2 == 1 && i < 15 {
            if let [b'-', rest @ ..] = src {
                src = rest;
            }
        }
    }
    if braces {
        let [b'}', rest @ ..] = src else { return None };
        src = rest;
    }
    src.is_empty().then_some(out)
}

// ---------------------------------------------------------------------------
// numeric
// ---------------------------------------------------------------------------

const NBASE: i32 = 10000;
const DEC_DIGITS: i32 = 4;
const NUMERIC_DSCALE_MAX: i32 = 0x3FFF;

/// A numeric value as `hash_numeric` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Num {
    /// NaN, Infinity, -Infinity: hash_numeric returns 0.
    Special,
    /// Base-10000 digits (most significant first) and the weight of the
    /// first one; the sign does not take part in the hash.
    Finite { weight: i32, digits: Vec<i16> },
}

impl Num {
    fn hash(&self) -> i32 {
        match self {
            Num::Special => 0,
            Num::Finite { weight, digits } => {
                let mut weight = *weight;
                let start = digits.iter().position(|&d| d != 0);
                let Some(start) = start else {
                    return -1;
                };
                weight -= start as i32;
                let end = digits.iter().rposition(|&d| d != 0).map_or(0, |i| i + 1);
                let bytes: Vec<u8> = digits[start..end].iter().flat_map(|d| d.to_le_bytes()).collect();
                (hash_bytes(&bytes) ^ weight as u32) as i32
            }
        }
    }

    /// `strip_var` + the overflow checks of `make_result`: the stored weight
    /// is an int16 and the display scale at most NUMERIC_DSCALE_MAX.
    fn finish(mut digits: Vec<i16>, mut weight: i32, dscale: i32) -> Option<Num> {
        let start = digits.iter().position(|&d| d != 0);
        match start {
            None => {
                digits.clear();
                weight = 0;
            }
            Some(start) => {
                let end = digits.iter().rposition(|&d| d != 0).map_or(0, |i| i + 1);
                weight -= start as i32;
                digits = digits[start..end].to_vec();
            }
        }
        if !(i32::from(i16::MIN)..=i32::from(i16::MAX)).contains(&weight) || !(0..=NUMERIC_DSCALE_MAX).contains(&dscale)
        {
            return None;
        }
        Some(Num::Finite { weight, digits })
    }
}

/// `numeric_in` without typmod (PostgreSQL 15: no underscores, no hex).
fn parse_numeric(s: &[u8]) -> Option<Num> {
    let s = trim_space(s);
    let lower = s.to_ascii_lowercase();
    if matches!(
        &lower[..],
        b"nan" | b"infinity" | b"+infinity" | b"-infinity" | b"inf" | b"+inf" | b"-inf"
    ) {
        return Some(Num::Special);
    }
    // Bound the work: PostgreSQL accepts longer inputs, but we do not
    // need to route them (None sends the query to the coordinator).
    if s.len() > 2000 {
        return None;
    }
    let mut cp = s;
    if let [b'+' | b'-', rest @ ..] = cp {
        cp = rest;
    }
    let mut have_dp = false;
    if let [b'.', rest @ ..] = cp {
        have_dp = true;
        cp = rest;
    }
    if !cp.first().is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let mut dec: Vec<u8> = Vec::with_capacity(cp.len());
    let mut dweight: i32 = -1;
    let mut dscale: i32 = 0;
    while let [c, rest @ ..] = cp {
        if c.is_ascii_digit() {
            dec.push(c - b'0');
            if have_dp {
                dscale += 1;
            } else {
                dweight += 1;
            }
        } else if *c == b'.' {
            if have_dp {
                return None;
            }
            have_dp = true;
        } else {
            break;
        }
        cp = rest;
    }
    if let [b'e' | b'E', rest @ ..] = cp {
        // strtol(): optional whitespace, optional sign, decimal digits.
        let mut r = rest;
        while let [c, tail @ ..] = r {
            if !is_space(*c) {
                break;
            }
            r = tail;
        }
        let (neg, digits) = match r {
            [b'-', t @ ..] => (true, t),
            [b'+', t @ ..] => (false, t),
            _ => (false, r),
        };
        let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        let mut exp: i64 = 0;
        for &d in &digits[..n] {
            exp = exp.saturating_mul(10).saturating_add(i64::from(d - b'0'));
        }
        // set_var_from_str: |exponent| >= INT_MAX / 2 is an overflow error.
        if exp >= i64::from(i32::MAX / 2) {
            return None;
        }
        let exp = if neg { -(exp as i32) } else { exp as i32 };
        dweight += exp;
        dscale = (dscale - exp).max(0);
        cp = &digits[n..];
    }
    if !cp.is_empty() {
        return None;
    }
    // Weight and alignment exactly as set_var_from_str.
    let weight = if dweight >= 0 {
        (dweight + 1 + DEC_DIGITS - 1) / DEC_DIGITS - 1
    } else {
        -((-dweight - 1) / DEC_DIGITS + 1)
    };
    let offset = (weight + 1) * DEC_DIGITS - (dweight + 1);
    let ndigits = (dec.len() as i32 + offset + DEC_DIGITS - 1) / DEC_DIGITS;
    let mut padded = vec![0u8; offset as usize];
    padded.extend_from_slice(&dec);
    padded.resize((ndigits * DEC_DIGITS) as usize, 0);
    let digits: Vec<i16> = padded
        .chunks(DEC_DIGITS as usize)
        .map(|c| c.iter().fold(0i16, |acc, &d| acc * 10 + i16::from(d)))
        .collect();
    Num::finish(digits, weight, dscale)
}

/// `numeric_recv` without typmod: ndigits, weight, sign, dscale (int16
/// each), then the base-10000 digits; digits hidden by dscale are truncated.
fn numeric_recv(v: &[u8]) -> Option<Num> {
    let rd = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*v.get(i)?, *v.get(i + 1)?])) };
    let ndigits = usize::from(rd(0)?);
    let weight = i32::from(rd(2)? as i16);
    let sign = rd(4)?;
    let dscale = rd(6)?;
    if v.len() != 8 + 2 * ndigits {
        return None;
    }
    if !matches!(sign, 0x0000 | 0x4000 | 0xC000 | 0xD000 | 0xF000) {
        return None;
    }
    if i32::from(dscale) & NUMERIC_DSCALE_MAX != i32::from(dscale) {
        return None;
    }
    let mut digits = Vec::with_capacity(ndigits);
    for i in 0..ndigits {
        let d = rd(8 + 2 * i)? as i16;
        if !(0..NBASE as i16).contains(&d) {
            return None;
        }
        digits.push(d);
    }
    if sign != 0x0000 && sign != 0x4000 {
        return Some(Num::Special);
    }
    let dscale = i32::from(dscale);
    // trunc_var(value, dscale)
    let di = (weight + 1) * DEC_DIGITS + dscale;
    if di <= 0 {
        return Num::finish(Vec::new(), 0, dscale);
    }
    let keep = ((di + DEC_DIGITS - 1) / DEC_DIGITS) as usize;
    if keep <= digits.len() {
        digits.truncate(keep);
        let rem = di % DEC_DIGITS;
        if rem > 0 {
            let pow = [1i16, 10, 100, 1000][(DEC_DIGITS - rem) as usize];
            let last = digits.last_mut().expect("keep >= 1");
            *last -= *last % pow;
        }
    }
    Num::finish(digits, weight, dscale)
}

// ---------------------------------------------------------------------------
// date / timestamp
// ---------------------------------------------------------------------------

/// POSTGRES_EPOCH_JDATE.
const POSTGRES_EPOCH_JDATE: i32 = 2_451_545;
/// date_recv's range: DATETIME_MIN_JULIAN (0) .. DATE_END_JULIAN.
const DATE_MIN_DAYS: i32 = -POSTGRES_EPOCH_JDATE;
const DATE_END_DAYS: i32 = 2_147_483_494 - POSTGRES_EPOCH_JDATE;
/// MIN_TIMESTAMP and END_TIMESTAMP (datatype/timestamp.h).
const MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;
const USECS_PER_DAY: i64 = 86_400_000_000;

/// `date2j`: Julian day number of a proleptic Gregorian date.
fn date2j(year: i32, month: i32, day: i32) -> i32 {
    let (mut y, mut m) = (year, month);
    if m > 2 {
        m += 1;
        y += 4800;
    } else {
        m += 13;
        y += 4799;
    }
    let century = y / 100;
    let mut julian = y * 365 - 32167;
    julian += y / 4 - century + century / 4;
    julian += 7834 * m / 256 + day;
    julian
}

fn two_digits(s: &[u8]) -> Option<i32> {
    match s {
        [a, b] if a.is_ascii_digit() && b.is_ascii_digit() => Some(i32::from(a - b'0') * 10 + i32::from(b - b'0')),
        _ => None,
    }
}

/// `YYYY-MM-DD` (year 0001..9999) → days since 2000-01-01.
fn parse_iso_date(s: &[u8]) -> Option<i32> {
    if s.len() != 10 || s[4] != b'-' || s[7] != b'-' {
        return None;
    }
    let year = std::str::from_utf8(&s[0..4]).ok()?.parse::<i32>().ok()?;
    if !s[0..4].iter().all(u8::is_ascii_digit) || year < 1 {
        return None;
    }
    let month = two_digits(&s[5..7])?;
    let day = two_digits(&s[8..10])?;
    if !(1..=12).contains(&month) || day < 1 {
        return None;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let mdays = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if day > mdays[(month - 1) as usize] {
        return None;
    }
    Some(date2j(year, month, day) - POSTGRES_EPOCH_JDATE)
}

/// `date_in`, restricted to what no session setting can change.
fn parse_date_value(s: &[u8]) -> Option<i32> {
    let s = trim_space(s);
    match &s.to_ascii_lowercase()[..] {
        b"infinity" => Some(i32::MAX),
        b"-infinity" => Some(i32::MIN),
        b"epoch" => Some(date2j(1970, 1, 1) - POSTGRES_EPOCH_JDATE),
        _ => parse_iso_date(s),
    }
}

/// `timestamp_in` / `timestamptz_in`, restricted: ISO date, optional time
/// with at most 6 fractional digits; for timestamptz an explicit UTC offset
/// is required, for timestamp none is allowed.
fn parse_timestamp(s: &[u8], with_tz: bool) -> Option<i64> {
    let s = trim_space(s);
    match &s.to_ascii_lowercase()[..] {
        b"infinity" => return Some(i64::MAX),
        b"-infinity" => return Some(i64::MIN),
        // 'epoch' is 1970-01-01 00:00:00 UTC for timestamptz, and midnight
        // for timestamp: the same number either way.
        b"epoch" => return Some(i64::from(date2j(1970, 1, 1) - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY),
        _ => {}
    }
    let days = parse_iso_date(s.get(..10)?)?;
    let mut rest = &s[10..];
    let mut usecs: i64 = 0;
    if let [b' ' | b'T', time @ ..] = rest {
        if time.first().is_some_and(u8::is_ascii_digit) {
            let hour = two_digits(time.get(0..2)?)?;
            if time.get(2) != Some(&b':') {
                return None;
            }
            let minute = two_digits(time.get(3..5)?)?;
            rest = &time[5..];
            let mut second = 0;
            let mut frac: i64 = 0;
            if let [b':', r @ ..] = rest {
                second = two_digits(r.get(0..2)?)?;
                rest = &r[2..];
                if let [b'.', r @ ..] = rest {
                    let n = r.iter().take_while(|c| c.is_ascii_digit()).count();
                    if n == 0 || n > 6 {
                        return None;
                    }
                    for i in 0..6 {
                        frac = frac * 10 + r.get(i).filter(|_| i < n).map_or(0, |d| i64::from(d - b'0'));
                    }
                    rest = &r[n..];
                }
            }
            if hour > 23 || minute > 59 || second > 59 {
                return None;
            }
            usecs = (i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)) * 1_000_000 + frac;
        } else {
            return None;
        }
    } else if with_tz {
        // A date alone: its midnight is in the session time zone.
        return None;
    }
    let mut offset_secs: i64 = 0;
    if with_tz {
        let tz = match rest {
            [b' ', r @ ..] => r,
            _ => rest,
        };
        offset_secs = parse_utc_offset(tz)?;
    } else if !rest.is_empty() {
        return None;
    }
    Some(i64::from(days) * USECS_PER_DAY + usecs - offset_secs * 1_000_000)
}

/// `Z`, `±HH`, `±HHMM`, `±HH:MM`, `±HH:MM:SS` → seconds east of UTC.
fn parse_utc_offset(s: &[u8]) -> Option<i64> {
    if s.eq_ignore_ascii_case(b"z") {
        return Some(0);
    }
    let (sign, body) = match s {
        [b'+', r @ ..] => (1, r),
        [b'-', r @ ..] => (-1, r),
        _ => return None,
    };
    let (h, m, sec) = match body.len() {
        2 => (two_digits(body)?, 0, 0),
        4 => (two_digits(&body[0..2])?, two_digits(&body[2..4])?, 0),
        5 if body[2] == b':' => (two_digits(&body[0..2])?, two_digits(&body[3..5])?, 0),
        8 if body[2] == b':' && body[5] == b':' => (
            two_digits(&body[0..2])?,
            two_digits(&body[3..5])?,
            two_digits(&body[6..8])?,
        ),
        _ => return None,
    };
    // MAX_TZDISP_HOUR = 15.
    if h > 15 || m > 59 || sec > 59 {
        return None;
    }
    Some(sign * (i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(sec)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ty: DistType, v: &str) -> Option<i32> {
        hash_text(ty, v.as_bytes())
    }

    /// citus.md §3, bigint table (hashint8).
    #[test]
    fn reference_bigint_values() {
        let cases: [(i64, i32); 14] = [
            (i64::MIN, -96758253),
            (-2147483649, -96758253),
            (-42, -487492805),
            (-1, 385747274),
            (0, -272711505),
            (1, -1905060026),
            (2, 1134484726),
            (42, 1509752520),
            (100, 108199381),
            (1000, -840720108),
            (2147483647, -96758253),
            (2147483648, -1524351049),
            (4294967296, -1905060026),
            (i64::MAX, -1524351049),
        ];
        for (v, h) in cases {
            assert_eq!(hashint8(v), h, "hashint8({v})");
            assert_eq!(t(DistType::Int8, &v.to_string()), Some(h), "text {v}");
            assert_eq!(hash_binary(DistType::Int8, &v.to_be_bytes()), Some(h), "binary {v}");
        }
        // hashint4 equals hashint8 in the int4 range.
        assert_eq!(t(DistType::Int4, "42"), Some(1509752520));
        assert_eq!(t(DistType::Int4, "-1"), Some(385747274));
        assert_eq!(t(DistType::Int2, "42"), Some(1509752520));
        assert_eq!(hash_binary(DistType::Int2, &(-1i16).to_be_bytes()), Some(385747274));
    }

    /// citus.md §3, text table (hashtext).
    #[test]
    fn reference_text_values() {
        let cases: [(&str, i32); 8] = [
            ("", -1477818771),
            ("42", 1865074622),
            ("abc", -785388649),
            ("ABC", 1723507180),
            ("abc ", 1599362634),
            ("user@example.com", 1805580667),
            ("é", -983094517),
            ("日本", -1851216170),
        ];
        for (v, h) in cases {
            assert_eq!(t(DistType::Text, v), Some(h), "hashtext({v:?})");
            assert_eq!(hash_binary(DistType::Text, v.as_bytes()), Some(h));
        }
        // The pitfall: '42' for a bigint column is hashint8(42).
        assert_eq!(t(DistType::Int8, "42"), Some(1509752520));
        // bpchar ignores trailing spaces.
        assert_eq!(t(DistType::Bpchar, "abc   "), Some(-785388649));
        assert_eq!(t(DistType::Bpchar, "   "), Some(-1477818771));
    }

    #[test]
    fn unaligned_and_long_keys_hash_the_same() {
        // hash_bytes must not depend on where the slice starts.
        let buf = b"xxxxthe quick brown fox jumps over the lazy dog".to_vec();
        let h = hash_bytes(&buf[4..]);
        let copy = buf[4..].to_vec();
        assert_eq!(hash_bytes(&copy), h);
    }

    /// Values checked against PostgreSQL 15.20 (`worker_hash`, `hash*`).
    #[test]
    fn values_verified_against_postgres() {
        // bool = hashchar(0/1) = hashint4(0/1)
        assert_eq!(t(DistType::Bool, "true"), Some(-1905060026));
        assert_eq!(t(DistType::Bool, " Of "), Some(-272711505));
        // date = hashint4(days since 2000-01-01)
        assert_eq!(t(DistType::Date, "2000-01-02"), Some(-1905060026));
        // numeric: sign not hashed, zero -> -1, NaN -> 0
        assert_eq!(t(DistType::Numeric, "1.5"), Some(692967894));
        assert_eq!(t(DistType::Numeric, "-1.50"), Some(692967894));
        assert_eq!(t(DistType::Numeric, "0.000"), Some(-1));
        assert_eq!(t(DistType::Numeric, "NaN"), Some(0));
    }

    #[test]
    fn int_input_follows_pg15() {
        assert_eq!(parse_int(b" \t-42\n", i64::MIN, i64::MAX), Some(-42));
        assert_eq!(parse_int(b"+7", i64::MIN, i64::MAX), Some(7));
        for bad in ["", " ", "-", "1_000", "0x10", "1.0", "1e3", "4 2", "--1"] {
            assert_eq!(parse_int(bad.as_bytes(), i64::MIN, i64::MAX), None, "{bad:?}");
        }
        assert_eq!(t(DistType::Int2, "32768"), None);
        assert!(t(DistType::Int2, "-32768").is_some());
        assert_eq!(t(DistType::Int4, "2147483648"), None);
        assert_eq!(t(DistType::Int8, "9223372036854775808"), None);
        assert!(t(DistType::Int8, "-9223372036854775808").is_some());
    }

    #[test]
    fn numeric_forms_agree() {
        let h = t(DistType::Numeric, "1.5");
        for v in ["1.50", "+1.5", "  1.5  ", "15e-1", "0.15E1", "01.5000", ".15e1", "-1.5"] {
            assert_eq!(t(DistType::Numeric, v), h, "{v:?}");
        }
        // strtol() skips whitespace after the 'e'.
        assert_eq!(t(DistType::Numeric, "15e -1"), h);
        assert_eq!(t(DistType::Numeric, "15e-0000000001"), h);
        for bad in [
            "",
            ".",
            "1..2",
            "1e",
            "e1",
            "1.5x",
            "1_0",
            "0x1",
            "1 e5",
            "1e1073741823",
        ] {
            assert_eq!(t(DistType::Numeric, bad), None, "{bad:?}");
        }
        // binary 1.5: ndigits 2, weight 0, sign +, dscale 1, digits 1 5000
        let bin = [0, 2, 0, 0, 0, 0, 0, 1, 0, 1, 0x13, 0x88];
        assert_eq!(hash_binary(DistType::Numeric, &bin), h);
        // 1.57 with dscale 1 truncates to 1.5
        let bin = [0, 2, 0, 0, 0, 0, 0, 1, 0, 1, 0x16, 0x58];
        assert_eq!(hash_binary(DistType::Numeric, &bin), h);
    }

    #[test]
    fn uuid_spellings() {
        let h = t(DistType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert!(h.is_some());
        for v in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
        ] {
            assert_eq!(t(DistType::Uuid, v), h, "{v:?}");
        }
        for bad in [
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
        ] {
            assert_eq!(t(DistType::Uuid, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn timestamps() {
        let midnight = t(DistType::Timestamp, "2000-01-01");
        assert_eq!(midnight, Some(hashint8(0)));
        assert_eq!(t(DistType::Timestamp, "2000-01-01 00:00:00.000001"), Some(hashint8(1)));
        assert_eq!(
            t(DistType::Timestamp, "2000-01-01T00:00:01.5"),
            Some(hashint8(1_500_000))
        );
        assert_eq!(t(DistType::Timestamp, "2000-01-01 00:00:00+00"), None);
        assert_eq!(t(DistType::Timestamptz, "2000-01-01 00:00:00"), None);
        assert_eq!(t(DistType::Timestamptz, "2000-01-01 00:00:00Z"), Some(hashint8(0)));
        assert_eq!(t(DistType::Timestamptz, "2000-01-01 01:00:00+01"), Some(hashint8(0)));
        assert_eq!(
            t(DistType::Timestamptz, "1999-12-31 23:30:00 -00:30"),
            Some(hashint8(0))
        );
        assert_eq!(t(DistType::Timestamp, "infinity"), Some(hashint8(i64::MAX)));
        assert_eq!(t(DistType::Date, "2000-02-30"), None);
        assert_eq!(t(DistType::Date, "01/02/2000"), None);
        assert_eq!(t(DistType::Date, "2024-02-29"), Some(hashint4(8825)));
    }

    /// Arbitrary bytes never panic (a cheap deterministic fuzz).
    #[test]
    fn arbitrary_input_never_panics() {
        let types = [
            DistType::Int2,
            DistType::Int4,
            DistType::Int8,
            DistType::Text,
            DistType::Bpchar,
            DistType::Uuid,
            DistType::Numeric,
            DistType::Date,
            DistType::Timestamp,
            DistType::Timestamptz,
            DistType::Bool,
        ];
        let alphabet = b"0123456789+-.eE :T{}aAfFnNzZ\t\x00\xff-9";
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let len = (next() % 40) as usize;
            let raw = next() % 2 == 0;
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if raw {
                        r as u8
                    } else {
                        alphabet[(r % alphabet.len() as u64) as usize]
                    }
                })
                .collect();
            for ty in types {
                let _ = hash_text(ty, &v);
                let _ = hash_binary(ty, &v);
            }
        }
        // Numeric binary headers with every sign/weight shape.
        for w in [i16::MIN, -1, 0, 1, i16::MAX] {
            for n in 0u16..4 {
                let mut v = vec![];
                v.extend_from_slice(&n.to_be_bytes());
                v.extend_from_slice(&w.to_be_bytes());
                v.extend_from_slice(&0u16.to_be_bytes());
                v.extend_from_slice(&0x3FFFu16.to_be_bytes());
                for _ in 0..n {
                    v.extend_from_slice(&9999u16.to_be_bytes());
                }
                let _ = hash_binary(DistType::Numeric, &v);
            }
        }
    }
}
