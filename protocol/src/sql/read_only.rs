//! The guard of read-only sessions: which statements could turn read-only
//! mode off. A read-only user's server connections log in with
//! `default_transaction_read_only = on`, so PostgreSQL refuses its writes;
//! this refuses what would change that setting (or `transaction_read_only`)
//! and lets everything else through, reads of the settings included.
//!
//! It works on tokens, so keywords in comments do not count and a setting
//! name in a string literal is only a name. A string literal that holds
//! more than a name (SQL for `EXECUTE`, a `DO` body, `query_to_xml`) is
//! refused if it mentions any of the ways out, which is the safe side. SQL
//! built from pieces at run time is beyond any scanner: PostgreSQL's
//! privileges are what really keep such a user from writing.

use super::{Lexer, Tok};

/// The settings that make transactions read-only.
const SETTINGS: [&[u8]; 2] = [b"default_transaction_read_only", b"transaction_read_only"];

/// What a string literal may not mention (in any case, words separated by
/// anything that is not part of a word).
const PHRASES_IN_STRINGS: [&[u8]; 6] = [
    b"transaction_read_only",
    b"read write",
    b"reset all",
    b"discard all",
    b"set_config",
    b"pg_settings",
];

/// Whether `sql` (one or more statements) might take a read-only session
/// out of read-only mode: SET or RESET of either setting (also inside
/// ALTER ... SET), RESET ALL, DISCARD ALL, `READ WRITE` (BEGIN, START
/// TRANSACTION, SET TRANSACTION, SET SESSION CHARACTERISTICS), set_config()
/// of either setting or of a name that is not a literal, UPDATE of
/// pg_settings, and string literals that mention any of these. SHOW and
/// `current_setting(...)` are reads and pass. No allocation.
pub fn may_leave_read_only(sql: &[u8]) -> bool {
    let mut lx = Lexer { s: sql, i: 0 };
    loop {
        match lx.next() {
            None => return false,
            Some(Tok::Semicolon) => {}
            Some(first) => {
                if statement_may_leave(first, &mut lx) {
                    return true;
                }
            }
        }
    }
}

/// Checks one statement, from its first token to its `;` (consumed).
fn statement_may_leave<'a>(first: Tok<'a>, lx: &mut Lexer<'a>) -> bool {
    if is_word(&first, b"show") {
        // SHOW only reads; skip to the end of the statement.
        while !matches!(lx.next(), None | Some(Tok::Semicolon)) {}
        return false;
    }
    let mut update = false;
    let mut pg_settings = false;
    let mut prev: Option<Tok<'a>> = None;
    let mut tok = Some(first);
    while let Some(t) = tok {
        if t == Tok::Semicolon {
            break;
        }
        let after_set = prev.as_ref().is_some_and(|p| {
            is_word(p, b"set") || is_word(p, b"reset") || is_word(p, b"session") || is_word(p, b"local")
        });
        match &t {
            Tok::Word(w) | Tok::Ident(w) => {
                if after_set && is_setting(w) {
                    return true;
                }
                if let Some(p) = &prev {
                    if (is_word(p, b"read") && w.eq_ignore_ascii_case(b"write"))
                        || ((is_word(p, b"reset") || is_word(p, b"discard")) && w.eq_ignore_ascii_case(b"all"))
                    {
                        return true;
                    }
                }
                update |= w.eq_ignore_ascii_case(b"update");
                pg_settings |= w.eq_ignore_ascii_case(b"pg_settings");
                if w.eq_ignore_ascii_case(b"set_config") && !set_config_is_harmless(lx) {
                    return true;
                }
            }
            Tok::Str(s) if !is_setting(s) && PHRASES_IN_STRINGS.iter().any(|p| contains_phrase(s, p)) => {
                return true;
            }
            _ => {}
        }
        prev = Some(t);
        tok = lx.next();
    }
    // pg_settings' update rule calls set_config().
    update && pg_settings
}

/// After `set_config`: true for a call whose first argument is a plain
/// literal naming some other setting. A computed name could be anything.
fn set_config_is_harmless(lx: &mut Lexer<'_>) -> bool {
    let save = lx.i;
    let harmless = lx.next() == Some(Tok::Punct(b'('))
        && matches!(lx.next(), Some(Tok::Str(name)) if !name.contains(&b'\\') && !is_setting(name))
        && lx.next() == Some(Tok::Punct(b','));
    lx.i = save;
    harmless
}

fn is_word(t: &Tok<'_>, kw: &[u8]) -> bool {
    matches!(t, Tok::Word(w) if w.eq_ignore_ascii_case(kw))
}

/// A name of one of the read-only settings (setting names ignore case,
/// quoted or not).
fn is_setting(name: &[u8]) -> bool {
    SETTINGS.iter().any(|s| name.eq_ignore_ascii_case(s))
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Whether `hay` contains `phrase`, ignoring case, where a space in
/// `phrase` stands for one or more bytes that are not part of a word
/// (white space, comments' punctuation, ...).
fn contains_phrase(hay: &[u8], phrase: &[u8]) -> bool {
    (0..hay.len()).any(|start| {
        let mut i = start;
        for &p in phrase {
            if p == b' ' {
                let from = i;
                while i < hay.len() && !is_word_byte(hay[i]) {
                    i += 1;
                }
                if i == from {
                    return false;
                }
            } else if i < hay.len() && hay[i].eq_ignore_ascii_case(&p) {
                i += 1;
            } else {
                return false;
            }
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ways_out_are_refused() {
        for q in [
            "SET default_transaction_read_only = off",
            "set default_transaction_read_only to DEFAULT",
            "SET SESSION default_transaction_read_only = off",
            "SET LOCAL transaction_read_only = off",
            "set transaction_read_only to off",
            "SET \"DEFAULT_TRANSACTION_READ_ONLY\" = off",
            "SET /* c */ default_transaction_read_only -- c\n = off",
            "SELECT 1; SET default_transaction_read_only = off",
            "SHOW transaction_read_only; SET default_transaction_read_only = off",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SET TRANSACTION READ WRITE",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
            "BEGIN READ   WRITE",
            "begin transaction read/* x */write",
            "START TRANSACTION READ WRITE",
            "start transaction isolation level serializable, read write",
            "RESET default_transaction_read_only",
            "RESET transaction_read_only",
            "reset ALL",
            "DISCARD\nALL",
            "ALTER ROLE other SET default_transaction_read_only = off",
            "select set_config('default_transaction_read_only', 'off', false)",
            "SELECT pg_catalog.set_config('Default_Transaction_Read_Only', 'off', false)",
            "SELECT set_config('transaction_read_only', 'off', true)",
            "SELECT set_config($$default_transaction_read_only$$, 'off', false)",
            "SELECT set_config(E'default\\x5ftransaction_read_only', 'off', false)",
            "SELECT set_config(name, 'off', false) FROM t",
            "SELECT set_config($1, $2, false)",
            "SELECT set_config('default_' || 'transaction_read_only', 'off', false)",
            "SELECT \"set_config\"('default_transaction_read_only', 'off', false)",
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'default_transaction_read_only'",
            "WITH x AS (UPDATE pg_catalog.pg_settings SET setting = 'off' RETURNING 1) SELECT 1",
            "DO $$ BEGIN PERFORM set_config('x', 'y', false); END $$",
            "DO $$BEGIN EXECUTE 'SET default_transaction_read_only = off'; END$$",
            "SELECT query_to_xml('select set_config(''default_transaction_read_only'',''off'',false)', false, false, '')",
            "SELECT query_to_xml('SET SESSION CHARACTERISTICS AS TRANSACTION READ  WRITE', false, false, '')",
            "DO 'BEGIN EXECUTE ''RESET ALL''; END'",
        ] {
            assert!(may_leave_read_only(q.as_bytes()), "should be refused: {q}");
        }
    }

    #[test]
    fn reads_and_other_statements_pass() {
        for q in [
            "SELECT 1",
            "SHOW default_transaction_read_only",
            "SHOW transaction_read_only",
            "show ALL",
            "SELECT current_setting('transaction_read_only')",
            "SELECT current_setting('default_transaction_read_only'), current_setting('Transaction_Read_Only')",
            "SELECT current_setting('transaction_read_only')::bool AS transaction_read_only",
            "SELECT setting FROM pg_settings WHERE name = 'default_transaction_read_only'",
            "SELECT name, setting FROM pg_settings WHERE name LIKE '%read_only%'",
            "BEGIN READ ONLY",
            "BEGIN",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "SET TRANSACTION READ ONLY",
            "SET search_path = public",
            "SELECT set_config('search_path', 'public', false)",
            "SELECT set_config('application_name', 'default_transaction_read_only', false)",
            "RESET search_path",
            "DISCARD PLANS",
            "INSERT INTO t VALUES ('read')",
            "UPDATE t SET x = 1",
            "SELECT 1 -- SET default_transaction_read_only = off",
            "SELECT /* read write */ 1",
            "SELECT 'read-only' AS mode",
            "",
            ";;",
        ] {
            assert!(!may_leave_read_only(q.as_bytes()), "should pass: {q}");
        }
    }

    #[test]
    fn phrases() {
        assert!(contains_phrase(b"x READ\n\t WRITE y", b"read write"));
        assert!(contains_phrase(b"read/**/write", b"read write"));
        assert!(!contains_phrase(b"readwrite", b"read write"));
        assert!(!contains_phrase(b"read_write", b"read write"));
        assert!(contains_phrase(
            b"Default_Transaction_Read_Only",
            b"transaction_read_only"
        ));
        assert!(!contains_phrase(b"read", b"read write"));
        assert!(!contains_phrase(b"", b"reset all"));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = may_leave_read_only(&data);
        }

        #[test]
        fn never_panics_on_sqlish(s in "[a-zA-Z_$'\"; ()/*\\-\n.E&,]{0,80}") {
            let _ = may_leave_read_only(s.as_bytes());
        }
    }
}
