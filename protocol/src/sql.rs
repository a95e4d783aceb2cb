//! A lexical scanner for SQL text: just enough to see which statements
//! create session state that transaction pooling must respect.
//!
//! It never parses SQL: it skips comments, string literals (standard, `E''`,
//! dollar-quoted) and quoted identifiers, splits statements on top-level
//! `;`, and looks at the first keywords of each statement plus a few
//! function names anywhere in it. It never fails: unknown input simply has
//! no effects. Cost is one pass over the bytes with no allocation unless a
//! session-level setting is found.

mod read_only;

pub use read_only::may_leave_read_only;

/// Session state that ties a client to its server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pin {
    Listen,
    AdvisoryLock,
    HoldCursor,
    TempTable,
    SqlPrepare,
    /// `set_config()` with a name that is not a literal: cannot be tracked.
    DynamicSetting,
}

impl Pin {
    pub fn as_str(self) -> &'static str {
        match self {
            Pin::Listen => "LISTEN",
            Pin::AdvisoryLock => "session advisory lock",
            Pin::HoldCursor => "WITH HOLD cursor",
            Pin::TempTable => "temporary table",
            Pin::SqlPrepare => "SQL PREPARE",
            Pin::DynamicSetting => "set_config with a computed name",
        }
    }
}

/// What a piece of SQL does to session state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// The first pinning construct found.
    pub pin: Option<Pin>,
    /// A statement that may release pinned state (UNLISTEN, CLOSE, DROP,
    /// DEALLOCATE, DISCARD, advisory unlock): worth re-checking the session.
    pub maybe_release: bool,
    /// Session-level settings changed by SET / RESET / set_config(), lower-case.
    pub settings: Vec<String>,
    /// `RESET ALL` or `DISCARD ALL` (which implies it).
    pub reset_all: bool,
    /// `DISCARD ALL`.
    pub discard_all: bool,
    /// `DEALLOCATE [PREPARE] name` or `DEALLOCATE ALL` (name `None`).
    pub deallocate: Option<Option<String>>,
    /// Number of statements seen.
    pub statements: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok<'a> {
    /// Unquoted word (keyword or identifier), original case.
    Word(&'a [u8]),
    /// Quoted identifier, without quotes.
    Ident(&'a [u8]),
    /// String literal body (escapes left as written).
    Str(&'a [u8]),
    Punct(u8),
    Semicolon,
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

impl<'a> Lexer<'a> {
    fn skip_space_and_comments(&mut self) {
        let s = self.s;
        loop {
            while self.i < s.len() && s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
            if s[self.i..].starts_with(b"--") {
                while self.i < s.len() && s[self.i] != b'\n' {
                    self.i += 1;
                }
            } else if s[self.i..].starts_with(b"/*") {
                // Comments nest in PostgreSQL.
                let mut depth = 0usize;
                while self.i < s.len() {
                    if s[self.i..].starts_with(b"/*") {
                        depth += 1;
                        self.i += 2;
                    } else if s[self.i..].starts_with(b"*/") {
                        depth -= 1;
                        self.i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        self.i += 1;
                    }
                }
            } else {
                return;
            }
        }
    }

    /// A quoted run ending at `q`, where a doubled `q` is an escaped quote,
    /// and backslash escapes too if `backslash`.
    fn quoted(&mut self, q: u8, backslash: bool) -> &'a [u8] {
        let start = self.i;
        let s = self.s;
        while self.i < s.len() {
            let c = s[self.i];
            if backslash && c == b'\\' {
                self.i += 2;
                continue;
            }
            if c == q {
                if self.i + 1 < s.len() && s[self.i + 1] == q {
                    self.i += 2;
                    continue;
                }
                let body = &s[start..self.i];
                self.i += 1;
                return body;
            }
            self.i += 1;
        }
        self.i = s.len();
        &s[start.min(s.len())..]
    }

    fn next(&mut self) -> Option<Tok<'a>> {
        self.skip_space_and_comments();
        let s = self.s;
        if self.i >= s.len() {
            return None;
        }
        let c = s[self.i];
        // E'...' / e'...' escape strings; also U&'...', B'...', X'...'.
        if (c == b'E' || c == b'e') && s.get(self.i + 1) == Some(&b'\'') {
            self.i += 2;
            return Some(Tok::Str(self.quoted(b'\'', true)));
        }
        if matches!(c, b'B' | b'b' | b'X' | b'x' | b'N' | b'n') && s.get(self.i + 1) == Some(&b'\'') {
            self.i += 2;
            return Some(Tok::Str(self.quoted(b'\'', false)));
        }
        if (c == b'U' || c == b'u')
            && s.get(self.i + 1) == Some(&b'&')
            && matches!(s.get(self.i + 2), Some(b'\'') | Some(b'"'))
        {
            let q = s[self.i + 2];
            self.i += 3;
            let body = self.quoted(q, false);
            return Some(if q == b'"' { Tok::Ident(body) } else { Tok::Str(body) });
        }
        if is_ident_start(c) {
            let start = self.i;
            while self.i < s.len() && is_ident_cont(s[self.i]) {
                self.i += 1;
            }
            return Some(Tok::Word(&s[start..self.i]));
        }
        match c {
            b'\'' => {
                self.i += 1;
                Some(Tok::Str(self.quoted(b'\'', false)))
            }
            b'"' => {
                self.i += 1;
                Some(Tok::Ident(self.quoted(b'"', false)))
            }
            b';' => {
                self.i += 1;
                Some(Tok::Semicolon)
            }
            b'$' => {
                // $n parameter or $tag$ dollar quote.
                let start = self.i;
                let mut j = self.i + 1;
                while j < s.len() && (is_ident_cont(s[j]) && s[j] != b'$') {
                    j += 1;
                }
                if j < s.len() && s[j] == b'$' && !s[start + 1..j].first().is_some_and(|d| d.is_ascii_digit()) {
                    let tag = &s[start..=j];
                    let body_start = j + 1;
                    let mut k = body_start;
                    while k + tag.len() <= s.len() {
                        if &s[k..k + tag.len()] == tag {
                            self.i = k + tag.len();
                            return Some(Tok::Str(&s[body_start..k]));
                        }
                        k += 1;
                    }
                    self.i = s.len();
                    return Some(Tok::Str(&s[body_start..]));
                }
                self.i = j.max(start + 1);
                Some(Tok::Punct(b'$'))
            }
            _ => {
                self.i += 1;
                Some(Tok::Punct(c))
            }
        }
    }
}

fn word_is(t: &Option<Tok<'_>>, kw: &str) -> bool {
    matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw.as_bytes()))
}

fn lower(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

/// Collects a possibly dotted setting name (`a`, `a.b`, `"A".b`) starting at `first`.
fn setting_name<'a>(first: Tok<'a>, lx: &mut Lexer<'a>) -> Option<String> {
    let mut name = match first {
        Tok::Word(w) => lower(w),
        Tok::Ident(w) => String::from_utf8_lossy(w).into_owned(),
        _ => return None,
    };
    loop {
        let save = lx.i;
        match lx.next() {
            Some(Tok::Punct(b'.')) => match lx.next() {
                Some(Tok::Word(w)) => {
                    name.push('.');
                    name.push_str(&lower(w));
                }
                Some(Tok::Ident(w)) => {
                    name.push('.');
                    name.push_str(&String::from_utf8_lossy(w));
                }
                _ => return Some(name),
            },
            _ => {
                lx.i = save;
                return Some(name);
            }
        }
    }
}

/// Scans SQL text and reports its effects on session state.
pub fn scan(sql: &[u8]) -> Effects {
    scan_fast(sql).unwrap_or_else(|| scan_all(sql))
}

/// Statements whose first word starts something `scan_all` looks into.
const SPECIAL_FIRST_WORDS: [&[u8]; 11] = [
    b"set",
    b"reset",
    b"listen",
    b"unlisten",
    b"close",
    b"drop",
    b"declare",
    b"prepare",
    b"deallocate",
    b"discard",
    b"create",
];

/// The common case without the lexer: one statement whose first word is
/// none of `SPECIAL_FIRST_WORDS`, in a text where no word can start with
/// "pg_" or "set_" (the functions `function_effects` looks for). Such a
/// statement has no effect; anything else (or anything unsure: a leading
/// comment, a semicolon before the end) returns None and is lexed.
fn scan_fast(sql: &[u8]) -> Option<Effects> {
    let start = sql.iter().position(|c| !c.is_ascii_whitespace())?;
    let word_len = sql[start..]
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .unwrap_or(sql.len() - start);
    // The lexer's first word must be exactly this one: letters only, not
    // followed by another identifier character.
    if word_len == 0 || sql.get(start + word_len).is_some_and(|&c| is_ident_cont(c)) {
        return None;
    }
    let word = &sql[start..start + word_len];
    if SPECIAL_FIRST_WORDS.iter().any(|k| word.eq_ignore_ascii_case(k)) {
        return None;
    }
    // One statement: semicolons only at the end.
    let end = sql.iter().rposition(|c| !c.is_ascii_whitespace() && *c != b';')? + 1;
    if sql[..end].contains(&b';') {
        return None;
    }
    // No "pg_" or "set_" anywhere, quoted or not (a superset of the
    // function names that matter).
    for (i, _) in sql.iter().enumerate().filter(|(_, &c)| c == b'_') {
        let before = &sql[..i];
        if before.len() >= 2 && before[i - 2..].eq_ignore_ascii_case(b"pg")
            || before.len() >= 3 && before[i - 3..].eq_ignore_ascii_case(b"set")
        {
            return None;
        }
    }
    Some(Effects {
        statements: 1,
        ..Effects::default()
    })
}

/// What `scan` finds, by lexing every statement.
fn scan_all(sql: &[u8]) -> Effects {
    let mut fx = Effects::default();
    let mut lx = Lexer { s: sql, i: 0 };
    loop {
        // Start of a statement.
        let first = match lx.next() {
            None => break,
            Some(Tok::Semicolon) => continue,
            Some(t) => t,
        };
        fx.statements += 1;
        let kw = match first {
            Tok::Word(w) => w,
            _ => b"" as &[u8],
        };
        let mut rest_scan_from_here = true;
        if kw.eq_ignore_ascii_case(b"set") {
            statement_set(&mut lx, &mut fx);
        } else if kw.eq_ignore_ascii_case(b"reset") {
            match lx.next() {
                Some(t) if word_is(&Some(t.clone()), "all") => fx.reset_all = true,
                Some(t) if word_is(&Some(t.clone()), "time") => fx.settings.push("timezone".into()),
                Some(t) if word_is(&Some(t.clone()), "session") => fx.settings.push("session_authorization".into()),
                Some(t) => {
                    if let Some(n) = setting_name(t, &mut lx) {
                        fx.settings.push(n);
                    }
                }
                None => {}
            }
        } else if kw.eq_ignore_ascii_case(b"listen") {
            fx.pin.get_or_insert(Pin::Listen);
        } else if kw.eq_ignore_ascii_case(b"unlisten")
            || kw.eq_ignore_ascii_case(b"close")
            || kw.eq_ignore_ascii_case(b"drop")
        {
            fx.maybe_release = true;
        } else if kw.eq_ignore_ascii_case(b"declare") {
            // DECLARE name ... CURSOR [WITH HOLD | WITHOUT HOLD] FOR query
            let mut prev_with = false;
            loop {
                match lx.next() {
                    None | Some(Tok::Semicolon) => {
                        rest_scan_from_here = false;
                        break;
                    }
                    Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"for") => break,
                    Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"hold") && prev_with => {
                        fx.pin.get_or_insert(Pin::HoldCursor);
                    }
                    Some(Tok::Word(w)) => prev_with = w.eq_ignore_ascii_case(b"with"),
                    _ => prev_with = false,
                }
            }
        } else if kw.eq_ignore_ascii_case(b"prepare") {
            let t = lx.next();
            if !word_is(&t, "transaction") {
                fx.pin.get_or_insert(Pin::SqlPrepare);
            }
        } else if kw.eq_ignore_ascii_case(b"deallocate") {
            fx.maybe_release = true;
            let mut t = lx.next();
            if word_is(&t, "prepare") {
                t = lx.next();
            }
            fx.deallocate = match t {
                Some(Tok::Word(w)) if w.eq_ignore_ascii_case(b"all") => Some(None),
                Some(Tok::Word(w)) => Some(Some(lower(w))),
                Some(Tok::Ident(w)) => Some(Some(String::from_utf8_lossy(w).into_owned())),
                _ => None,
            };
        } else if kw.eq_ignore_ascii_case(b"discard") {
            fx.maybe_release = true;
            if word_is(&lx.next(), "all") {
                fx.discard_all = true;
                fx.reset_all = true;
            }
        } else if kw.eq_ignore_ascii_case(b"create") {
            let mut t = lx.next();
            if word_is(&t, "or") {
                lx.next();
                t = lx.next();
            }
            if word_is(&t, "global") || word_is(&t, "local") {
                t = lx.next();
            }
            if word_is(&t, "temp") || word_is(&t, "temporary") {
                fx.pin.get_or_insert(Pin::TempTable);
            }
        }
        if !rest_scan_from_here {
            continue;
        }
        // Rest of the statement: function names that matter anywhere.
        loop {
            match lx.next() {
                None | Some(Tok::Semicolon) => break,
                Some(Tok::Word(w)) => function_effects(w, &mut lx, &mut fx),
                _ => {}
            }
        }
    }
    fx
}

fn function_effects<'a>(w: &'a [u8], lx: &mut Lexer<'a>, fx: &mut Effects) {
    // Every name below is at least 10 bytes long and starts with "pg_" or
    // "set_": a cheap filter before any comparison.
    if w.len() < 10 || !(w[..3].eq_ignore_ascii_case(b"pg_") || w[..4].eq_ignore_ascii_case(b"set_")) {
        return;
    }
    let is = |name: &str| w.eq_ignore_ascii_case(name.as_bytes());
    if is("pg_advisory_lock")
        || is("pg_advisory_lock_shared")
        || is("pg_try_advisory_lock")
        || is("pg_try_advisory_lock_shared")
    {
        fx.pin.get_or_insert(Pin::AdvisoryLock);
    } else if is("pg_advisory_unlock") || is("pg_advisory_unlock_shared") || is("pg_advisory_unlock_all") {
        fx.maybe_release = true;
    } else if is("set_config") {
        let save = lx.i;
        if lx.next() == Some(Tok::Punct(b'(')) {
            if let Some(Tok::Str(name)) = lx.next() {
                fx.settings.push(lower(name));
                return;
            }
            fx.pin.get_or_insert(Pin::DynamicSetting);
        }
        lx.i = save;
    }
}

/// `SET ...`: records the setting; the caller scans the rest of the statement.
fn statement_set(lx: &mut Lexer<'_>, fx: &mut Effects) {
    let mut t = lx.next();
    if word_is(&t, "local") || word_is(&t, "transaction") || word_is(&t, "constraints") {
        // Transaction-scoped: PostgreSQL undoes it at transaction end.
        return;
    }
    if word_is(&t, "session") {
        t = lx.next();
        if word_is(&t, "authorization") {
            fx.settings.push("session_authorization".into());
            return;
        }
        if word_is(&t, "characteristics") {
            for n in [
                "default_transaction_isolation",
                "default_transaction_read_only",
                "default_transaction_deferrable",
            ] {
                fx.settings.push(n.into());
            }
            return;
        }
    }
    let name = if word_is(&t, "time") {
        Some("timezone".to_owned())
    } else if word_is(&t, "names") {
        Some("client_encoding".to_owned())
    } else if word_is(&t, "schema") {
        Some("search_path".to_owned())
    } else if word_is(&t, "xml") {
        Some("xmloption".to_owned())
    } else {
        t.and_then(|t| setting_name(t, lx))
    };
    if let Some(n) = name {
        fx.settings.push(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    #[test]
    fn the_fast_path_takes_plain_statements_only() {
        for plain in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "  update pgbench_branches set bbalance = bbalance + 1 where bid = 3;  ",
            "INSERT INTO t VALUES ('a;b'::text)",
        ] {
            // The quoted semicolon sends the last one to the lexer.
            let fast = scan_fast(plain.as_bytes());
            assert_eq!(fast.is_some(), !plain.contains("'a;b'"), "{plain}");
            assert_eq!(scan(plain.as_bytes()).statements, 1);
        }
        for lexed in [
            "SET x = 1",
            "select pg_advisory_lock(1)",
            "select SET_CONFIG('a', 'b', false)",
            "/* c */ LISTEN x",
            "SELECT 1; LISTEN x",
            "select$1",
            "",
            "   ",
        ] {
            assert_eq!(scan_fast(lexed.as_bytes()), None, "{lexed}");
        }
        assert_eq!(scan(b"select pg_advisory_lock(1)").pin, Some(Pin::AdvisoryLock));
    }

    #[test]
    fn plain_queries_have_no_effects() {
        let fx = scan(b"SELECT * FROM t WHERE a = 'LISTEN x; SET y = 1' -- LISTEN\n/* PREPARE /* nested */ */");
        assert_eq!(fx.pin, None);
        assert!(fx.settings.is_empty());
        assert_eq!(fx.statements, 1);
    }

    #[test]
    fn session_settings() {
        let fx = scan(b"set search_path to a, b; SET LOCAL work_mem = '1MB'; set time zone 'UTC'; SET \"My\".x = 1; RESET statement_timeout");
        assert_eq!(
            fx.settings,
            vec!["search_path", "timezone", "My.x", "statement_timeout"]
        );
        assert_eq!(fx.pin, None);
        assert_eq!(fx.statements, 5);
    }

    #[test]
    fn pins() {
        assert_eq!(scan(b"LISTEN chan").pin, Some(Pin::Listen));
        assert_eq!(scan(b"select pg_advisory_lock(1)").pin, Some(Pin::AdvisoryLock));
        assert_eq!(scan(b"select pg_advisory_xact_lock(1)").pin, None);
        assert_eq!(
            scan(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1").pin,
            Some(Pin::HoldCursor)
        );
        assert_eq!(scan(b"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1").pin, None);
        assert_eq!(scan(b"create temp table t(a int)").pin, Some(Pin::TempTable));
        assert_eq!(
            scan(b"CREATE GLOBAL TEMPORARY TABLE t(a int)").pin,
            Some(Pin::TempTable)
        );
        assert_eq!(scan(b"PREPARE p AS SELECT 1").pin, Some(Pin::SqlPrepare));
        assert_eq!(scan(b"PREPARE TRANSACTION 'x'").pin, None);
        assert_eq!(
            scan(b"select set_config(name, 'v', false)").pin,
            Some(Pin::DynamicSetting)
        );
        assert_eq!(
            scan(b"select set_config('search_path', '', false)").settings,
            vec!["search_path"]
        );
    }

    #[test]
    fn strings_hide_keywords() {
        assert_eq!(scan(b"select $$ LISTEN x; $$, $a$ pg_advisory_lock( $a$").pin, None);
        assert_eq!(scan(b"select E'\\' LISTEN'").pin, None);
        assert_eq!(scan(b"select 'it''s'; LISTEN x").pin, Some(Pin::Listen));
        assert_eq!(scan(b"select $1; LISTEN x").pin, Some(Pin::Listen));
    }

    #[test]
    fn discard_and_deallocate() {
        let fx = scan(b"DISCARD ALL");
        assert!(fx.discard_all && fx.reset_all);
        assert_eq!(scan(b"DEALLOCATE PREPARE s1").deallocate, Some(Some("s1".into())));
        assert_eq!(scan(b"deallocate all").deallocate, Some(None));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = scan(&data);
        }

        #[test]
        fn never_panics_on_sqlish(s in "[a-zA-Z$'\"; ()/*\\-\n.E&]{0,80}") {
            let _ = scan(s.as_bytes());
        }

        /// The shortcut agrees with the lexer whenever it answers, on text
        /// built from the words and punctuation that matter.
        #[test]
        fn the_fast_path_agrees_with_the_lexer(parts in proptest::collection::vec(prop_oneof![
            Just("SELECT"), Just("select"), Just("set"), Just("SET"), Just("listen"), Just("Create"),
            Just("temp"), Just("prepare"), Just("discard"), Just("all"), Just("pg_advisory_lock"),
            Just("PG_ADVISORY_LOCK"), Just("set_config"), Just("pgbench_accounts"), Just("offset_x"),
            Just("x"), Just("1"), Just("$1"), Just("$$"), Just("'"), Just("\""), Just(";"), Just("("),
            Just(")"), Just(" "), Just("\n"), Just("--"), Just("/*"), Just("*/"), Just("_"), Just("é"),
        ], 0..12)) {
            let text = parts.concat();
            if let Some(fast) = scan_fast(text.as_bytes()) {
                prop_assert_eq!(fast, scan_all(text.as_bytes()), "{:?}", text);
            }
        }
    }
}
