//! Request generation. Static messages are encoded once per client; per
//! transaction only the random numbers are written into a reused buffer.

use bytes::{BufMut, BytesMut};
use pgferry_protocol::encode;

use crate::cli::WorkloadKind;

/// pgbench's table sizes for one scale factor.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub accounts: u64,
    pub tellers: u64,
    pub branches: u64,
}

impl Scale {
    pub fn new(scale: u64, accounts: Option<u64>) -> Self {
        let scale = scale.max(1);
        Scale {
            accounts: accounts.unwrap_or(scale * 100_000).max(1),
            tellers: scale * 10,
            branches: scale,
        }
    }
}

const SELECT_SQL_PREFIX: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = ";
const SELECT_SQL_PARAM: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const PREPARED_NAME: &[u8] = b"pgferry_lt_select";

/// pgbench's built-in "tpcb-like" script as one multi-statement Query.
/// Variables: 0 = aid, 1 = bid, 2 = tid, 3 = delta.
const WRITE_SQL: &str = "BEGIN;\
UPDATE pgbench_accounts SET abalance = abalance + {3} WHERE aid = {0};\
SELECT abalance FROM pgbench_accounts WHERE aid = {0};\
UPDATE pgbench_tellers SET tbalance = tbalance + {3} WHERE tid = {2};\
UPDATE pgbench_branches SET bbalance = bbalance + {3} WHERE bid = {1};\
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({2}, {1}, {0}, {3}, CURRENT_TIMESTAMP);\
END;";

/// A text with numbered `{N}` placeholders, split once into pieces.
struct Template {
    pieces: Vec<Piece>,
}

enum Piece {
    Text(Vec<u8>),
    Var(usize),
}

impl Template {
    fn parse(s: &str) -> Template {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let close = open + rest[open..].find('}').expect("unclosed placeholder");
            if open > 0 {
                pieces.push(Piece::Text(rest.as_bytes()[..open].to_vec()));
            }
            pieces.push(Piece::Var(rest[open + 1..close].parse().expect("placeholder index")));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.as_bytes().to_vec()));
        }
        Template { pieces }
    }

    fn render(&self, out: &mut BytesMut, vars: &[i64]) {
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.put_slice(t),
                Piece::Var(i) => put_int(out, vars[*i]),
            }
        }
    }
}

/// Writes `v` in decimal without going through `fmt`.
pub fn put_int(out: &mut BytesMut, v: i64) {
    if v < 0 {
        out.put_u8(b'-');
    }
    out.put_slice(pgferry_protocol::encode::decimal(v.unsigned_abs(), &mut [0; 20]).as_bytes());
}

/// xorshift64*: a few instructions per number, plenty for picking rows.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that neighbouring seeds diverge at once.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `1..=n`.
    #[inline]
    pub fn between_1_and(&mut self, n: u64) -> i64 {
        (((self.next_u64() as u128 * n as u128) >> 64) as u64 + 1) as i64
    }
}

/// Builds the requests of one client.
pub struct Generator {
    kind: WorkloadKind,
    scale: Scale,
    rng: Rng,
    buf: BytesMut,
    /// Encoded messages sent before / after the per-transaction part.
    head: Vec<u8>,
    tail: Vec<u8>,
    write: Option<Template>,
}

impl Generator {
    pub fn new(kind: WorkloadKind, scale: Scale, seed: u64) -> Generator {
        let mut head = BytesMut::new();
        let mut tail = BytesMut::new();
        match kind {
            WorkloadKind::SelectExtended => {
                encode::parse(&mut head, b"", SELECT_SQL_PARAM, &0i16.to_be_bytes());
                describe_execute_sync(&mut tail);
            }
            WorkloadKind::SelectPrepared => describe_execute_sync(&mut tail),
            _ => {}
        }
        Generator {
            kind,
            scale,
            rng: Rng::new(seed),
            buf: BytesMut::with_capacity(512),
            head: head.to_vec(),
            tail: tail.to_vec(),
            write: (kind == WorkloadKind::Write).then(|| Template::parse(WRITE_SQL)),
        }
    }

    /// What a new connection must run before its first transaction
    /// (select-prepared: Parse the named statement, then Sync).
    pub fn connection_setup(&self) -> Option<Vec<u8>> {
        (self.kind == WorkloadKind::SelectPrepared).then(|| {
            let mut b = BytesMut::new();
            encode::parse(&mut b, PREPARED_NAME, SELECT_SQL_PARAM, &0i16.to_be_bytes());
            encode::sync(&mut b);
            b.to_vec()
        })
    }

    /// Uniform in `[0, 1)`, from this client's generator.
    pub fn fraction(&mut self) -> f64 {
        self.rng.fraction()
    }

    /// The bytes of the next transaction.
    pub fn next_request(&mut self) -> &[u8] {
        self.buf.clear();
        match self.kind {
            WorkloadKind::SelectSimple => {
                let aid = self.rng.between_1_and(self.scale.accounts);
                encode::message(&mut self.buf, b'Q', |b| {
                    b.put_slice(SELECT_SQL_PREFIX);
                    put_int(b, aid);
                    b.put_u8(0);
                });
            }
            WorkloadKind::SelectExtended | WorkloadKind::SelectPrepared => {
                let aid = self.rng.between_1_and(self.scale.accounts);
                let statement: &[u8] = if self.kind == WorkloadKind::SelectPrepared {
                    PREPARED_NAME
                } else {
                    b""
                };
                self.buf.put_slice(&self.head);
                encode::message(&mut self.buf, b'B', |b| {
                    b.put_u8(0); // unnamed portal
                    b.put_slice(statement);
                    b.put_u8(0);
                    b.put_i16(0); // parameter formats: all text
                    b.put_i16(1); // one parameter
                    let len_at = b.len();
                    b.put_i32(0);
                    put_int(b, aid);
                    let len = (b.len() - len_at - 4) as i32;
                    b[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
                    b.put_i16(0); // result formats: all text
                });
                self.buf.put_slice(&self.tail);
            }
            WorkloadKind::Write => {
                let vars = [
                    self.rng.between_1_and(self.scale.accounts),
                    self.rng.between_1_and(self.scale.branches),
                    self.rng.between_1_and(self.scale.tellers),
                    self.rng.between_1_and(10_001) - 5_001,
                ];
                let template = self.write.as_ref().expect("write template");
                encode::message(&mut self.buf, b'Q', |b| {
                    template.render(b, &vars);
                    b.put_u8(0);
                });
            }
            WorkloadKind::Connect => encode::query(&mut self.buf, b"SELECT 1"),
        }
        &self.buf
    }
}

/// Describe portal, Execute (no row limit), Sync: what libpq sends after Bind.
fn describe_execute_sync(buf: &mut BytesMut) {
    encode::describe(buf, b'P', b"");
    encode::message(buf, b'E', |b| {
        b.put_u8(0); // unnamed portal
        b.put_i32(0); // all rows
    });
    encode::sync(buf);
}

/// The request that rolls back a transaction left open by a failed one.
pub fn rollback() -> Vec<u8> {
    let mut b = BytesMut::new();
    encode::query(&mut b, b"ROLLBACK");
    b.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_protocol::frame::decode_frame;
    use pgferry_protocol::frontend;

    fn frames(bytes: &[u8]) -> Vec<pgferry_protocol::Frame> {
        let mut b = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = decode_frame(&mut b, 1 << 20).unwrap() {
            out.push(f);
        }
        assert!(b.is_empty());
        out
    }

    #[test]
    fn ints() {
        for v in [0i64, 7, -5000, 1_000_000, i64::MIN + 1, i64::MAX] {
            let mut b = BytesMut::new();
            put_int(&mut b, v);
            assert_eq!(&b[..], v.to_string().as_bytes());
        }
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(1);
        let mut seen = [false; 10];
        for _ in 0..10_000 {
            let v = r.between_1_and(10);
            assert!((1..=10).contains(&v));
            seen[v as usize - 1] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn simple_select_is_one_query() {
        let mut g = Generator::new(WorkloadKind::SelectSimple, Scale::new(1, None), 3);
        let f = frames(g.next_request());
        assert_eq!(f.len(), 1);
        let sql = std::str::from_utf8(frontend::query(f[0].body()).unwrap()).unwrap();
        let aid: u64 = sql
            .strip_prefix("SELECT abalance FROM pgbench_accounts WHERE aid = ")
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=100_000).contains(&aid));
    }

    #[test]
    fn extended_and_prepared_messages() {
        let mut g = Generator::new(WorkloadKind::SelectExtended, Scale::new(1, None), 3);
        let tags: Vec<u8> = frames(g.next_request()).iter().map(|f| f.tag).collect();
        assert_eq!(tags, b"PBDES");
        let f = frames(g.next_request());
        assert_eq!(frontend::parse(f[0].body()).unwrap().query, SELECT_SQL_PARAM);

        let mut g = Generator::new(WorkloadKind::SelectPrepared, Scale::new(1, None), 3);
        let setup = frames(&g.connection_setup().unwrap());
        assert_eq!(frontend::parse(setup[0].body()).unwrap().name, PREPARED_NAME);
        let f = frames(g.next_request());
        assert_eq!(f.iter().map(|f| f.tag).collect::<Vec<_>>(), b"BDES");
        let bind = frontend::bind(f[0].body()).unwrap();
        assert_eq!(bind.statement, PREPARED_NAME);
        let rest = &f[0].body()[bind.rest_offset..];
        let len = i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let aid: u64 = std::str::from_utf8(&rest[8..8 + len]).unwrap().parse().unwrap();
        assert!((1..=100_000).contains(&aid));
        assert_eq!(&rest[8 + len..], &[0, 0]);
    }

    #[test]
    fn write_transaction_substitutes_all_variables() {
        let mut g = Generator::new(WorkloadKind::Write, Scale::new(2, None), 9);
        let f = frames(g.next_request());
        let sql = std::str::from_utf8(frontend::query(f[0].body()).unwrap()).unwrap();
        assert!(sql.starts_with("BEGIN;UPDATE pgbench_accounts SET abalance = abalance + "));
        assert!(sql.ends_with("CURRENT_TIMESTAMP);END;"));
        assert!(!sql.contains('{'));
        assert_eq!(sql.matches(';').count(), 7);
    }
}
