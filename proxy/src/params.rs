//! Session parameters of a client in transaction mode.
//!
//! Two kinds are kept per client:
//! * *reported* parameters, those the server announces with ParameterStatus
//!   (TimeZone, DateStyle, application_name, ...): their values follow every
//!   ParameterStatus the client's server sends, so SET, SET LOCAL and
//!   rolled-back SETs come out exactly as PostgreSQL decides;
//! * *settings* the server does not report (search_path before PostgreSQL 18,
//!   statement_timeout, ...): the session reads their final values with
//!   `current_setting()` at the end of a transaction that changed them.
//!
//! Before a client's transaction runs on a server connection whose values
//! differ, [`sync_sql`] builds the statements that bring it in line.

use pgferry_pool::ServerConn;
use pgferry_protocol::encode::sql_literal;
use std::sync::Arc;

/// Reported parameters that a client can change and that pgferry keeps per client.
pub const SYNCED: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "application_name",
    "standard_conforming_strings",
    "default_transaction_read_only",
    "search_path",
    "session_authorization",
];

/// Reported parameters that describe the server itself. When a client moves
/// to a server where one differs (a failover, another standby), the client
/// is told with a ParameterStatus.
pub const INFORMATIONAL: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "in_hot_standby",
];

/// PostgreSQL's spelling of a reported parameter, whatever case the client used.
pub fn canonical(name: &str) -> String {
    for &n in SYNCED.iter().chain(INFORMATIONAL) {
        if n.eq_ignore_ascii_case(name) {
            return n.to_owned();
        }
    }
    name.to_ascii_lowercase()
}

/// A client's parameters: the pool's defaults, shared, plus its own values.
#[derive(Debug, Clone)]
pub struct ClientParams {
    base: Arc<Vec<(String, String)>>,
    overrides: Vec<(String, String)>,
    /// Boxed: most clients have no unreported settings, and every idle
    /// client's size counts (a parked one is kept in a table).
    extra: Option<Box<Extra>>,
    fingerprint: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Extra {
    /// Unreported settings the client changed, with their current values.
    settings: Vec<(String, String)>,
    /// Startup values of unreported settings, restored by DISCARD ALL /
    /// RESET ALL.
    startup: Vec<(String, String)>,
}

/// An order-independent hash of the values that must match between a client
/// and a server connection: equal fingerprints mean nothing to sync, so the
/// common case costs one comparison per transaction.
fn fingerprint<'a>(reported: impl Fn(&str) -> Option<&'a str>, settings: &[(String, String)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let entry = |kind: u8, k: &str, v: Option<&str>| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (kind, k, v).hash(&mut h);
        h.finish()
    };
    let mut fp = 0u64;
    for &name in SYNCED.iter().chain(INFORMATIONAL) {
        fp ^= entry(0, name, reported(name));
    }
    for (k, v) in settings {
        fp ^= entry(1, k, Some(v));
    }
    fp
}

/// The fingerprint of a server connection's session, cached on it.
pub fn server_fingerprint(conn: &mut ServerConn) -> u64 {
    if let Some(fp) = conn.fingerprint {
        return fp;
    }
    let fp = fingerprint(|n| conn.param(n), conn.settings());
    conn.fingerprint = Some(fp);
    fp
}

fn find<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

impl ClientParams {
    /// `startup` holds the client's startup parameters (already without
    /// user, database and options' `-c` split out).
    pub fn new(base: Arc<Vec<(String, String)>>, startup: &[(String, String)]) -> Self {
        let mut p = ClientParams {
            base,
            overrides: Vec::new(),
            extra: None,
            fingerprint: None,
        };
        for (k, v) in startup {
            let name = canonical(k);
            if p.is_reported(&name) {
                // Keep the server's spelling when it is the same value.
                let v = match p.get(&name) {
                    Some(cur) if cur.eq_ignore_ascii_case(v) => cur.to_owned(),
                    _ => v.clone(),
                };
                p.set(&name, &v);
            } else {
                let e = p.extra_mut();
                pgferry_pool::server::set(&mut e.settings, &name, v);
                // Only unreported values are restored from here (a reported
                // one comes back from the server with RESET ALL): a typical
                // client keeps nothing here.
                e.startup.push((name, v.clone()));
            }
        }
        // Held for the client's life: no spare capacity (bytes per client).
        p.overrides.shrink_to_fit();
        if let Some(e) = &mut p.extra {
            e.settings.shrink_to_fit();
            e.startup.shrink_to_fit();
        }
        p
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    /// True if the server reports this parameter (it is in the pool's
    /// startup parameters).
    pub fn is_reported(&self, name: &str) -> bool {
        find(&self.base, name).is_some()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        find(&self.overrides, name).or_else(|| find(&self.base, name))
    }

    /// The client's value of any parameter pgferry keeps: reported ones
    /// first, then the settings it syncs (search_path, unless the server
    /// reports it).
    pub fn value(&self, name: &str) -> Option<&str> {
        self.get(name).or_else(|| find(self.settings(), name))
    }

    /// The client's fingerprint (see [`server_fingerprint`]).
    pub fn fingerprint(&mut self) -> u64 {
        if let Some(fp) = self.fingerprint {
            return fp;
        }
        let fp = fingerprint(
            |n| find(&self.overrides, n).or_else(|| find(&self.base, n)),
            self.settings(),
        );
        self.fingerprint = Some(fp);
        fp
    }

    pub fn settings(&self) -> &[(String, String)] {
        self.extra.as_ref().map_or(&[], |e| &e.settings)
    }

    /// Records a reported value; returns true if it changed.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        if self.get(name) == Some(value) {
            return false;
        }
        self.fingerprint = None;
        if find(&self.base, name) == Some(value) {
            self.overrides.retain(|(k, _)| k != name);
        } else {
            pgferry_pool::server::set(&mut self.overrides, name, value);
        }
        true
    }

    /// All reported values as the client sees them, for login.
    pub fn reported(&self) -> impl Iterator<Item = (&str, &str)> {
        self.base
            .iter()
            .map(|(k, _)| (k.as_str(), self.get(k).unwrap_or("")))
            .chain(
                self.overrides
                    .iter()
                    .filter(|(k, _)| find(&self.base, k).is_none())
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
    }

    /// RESET ALL semantics: unreported settings go back to their startup values.
    pub fn reset_settings(&mut self) {
        self.fingerprint = None;
        if let Some(e) = &mut self.extra {
            if e.startup.is_empty() {
                self.extra = None;
            } else {
                let Extra { settings, startup } = &mut **e;
                settings.clear();
                settings.extend(startup.iter().cloned());
            }
        }
    }

    pub fn set_setting(&mut self, name: &str, value: Option<&str>) {
        self.fingerprint = None;
        match value {
            Some(v) => pgferry_pool::server::set(&mut self.extra_mut().settings, name, v),
            None => {
                if let Some(e) = &mut self.extra {
                    e.settings.retain(|(k, _)| k != name);
                }
            }
        }
    }
}

fn quote_ident_path(out: &mut Vec<u8>, name: &str) {
    for (i, part) in name.split('.').enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        out.push(b'"');
        for c in part.bytes() {
            if c == b'"' {
                out.push(b'"');
            }
            out.push(c);
        }
        out.push(b'"');
    }
}

fn push_set_config(sql: &mut Vec<u8>, name: &str, value: &str) {
    sql.extend_from_slice(b"SELECT pg_catalog.set_config(");
    sql_literal(sql, name.as_bytes());
    sql.extend_from_slice(b", ");
    sql_literal(sql, value.as_bytes());
    sql.extend_from_slice(b", false);");
}

/// SQL that brings `server` to the client's values, or None if they agree.
pub fn sync_sql(client: &ClientParams, server: &ServerConn) -> Option<Vec<u8>> {
    let mut sql = Vec::new();
    for &name in SYNCED {
        if let Some(want) = client.get(name) {
            if server.param(name) != Some(want) {
                push_set_config(&mut sql, name, want);
            }
        }
    }
    for (name, want) in client.settings() {
        if server.setting(name) != Some(want.as_str()) {
            push_set_config(&mut sql, name, want);
        }
    }
    for (name, _) in server.settings() {
        if find(client.settings(), name).is_none() {
            sql.extend_from_slice(b"RESET ");
            quote_ident_path(&mut sql, name);
            sql.push(b';');
        }
    }
    (!sql.is_empty()).then_some(sql)
}

/// `SELECT current_setting('a', true), ...` for capturing unreported settings.
pub fn capture_sql(names: &[String]) -> Vec<u8> {
    let mut sql = b"SELECT ".to_vec();
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            sql.extend_from_slice(b", ");
        }
        sql.extend_from_slice(b"pg_catalog.current_setting(");
        sql_literal(&mut sql, n.as_bytes());
        sql.extend_from_slice(b", true)");
    }
    sql
}

/// Counts the session state that keeps a client pinned; 0 means it may unpin.
pub const PIN_PROBE_SQL: &[u8] = b"SELECT (SELECT count(*) FROM pg_catalog.pg_listening_channels())\
 + (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())\
 + (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)\
 + (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql)\
 + (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())";

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Arc<Vec<(String, String)>> {
        Arc::new(vec![
            ("TimeZone".into(), "UTC".into()),
            ("client_encoding".into(), "UTF8".into()),
        ])
    }

    #[test]
    fn startup_params_split_by_kind() {
        let p = ClientParams::new(
            base(),
            &[
                ("timezone".into(), "Europe/Paris".into()),
                ("client_encoding".into(), "utf8".into()),
                ("search_path".into(), "a".into()),
            ],
        );
        assert_eq!(p.get("TimeZone"), Some("Europe/Paris"));
        assert_eq!(
            p.get("client_encoding"),
            Some("UTF8"),
            "same value keeps the server's spelling"
        );
        assert_eq!(p.settings(), [("search_path".to_string(), "a".to_string())]);
    }

    #[test]
    fn reset_restores_unreported_startup_values_only() {
        let mut p = ClientParams::new(
            base(),
            &[
                ("TimeZone".into(), "Europe/Paris".into()),
                ("search_path".into(), "a".into()),
            ],
        );
        assert_eq!(
            p.extra.as_ref().unwrap().startup,
            [("search_path".to_string(), "a".to_string())],
            "reported values are not kept"
        );
        p.set_setting("search_path", Some("b"));
        p.set_setting("statement_timeout", Some("5s"));
        p.set("TimeZone", "UTC");
        p.reset_settings();
        assert_eq!(p.settings(), [("search_path".to_string(), "a".to_string())]);
        // The reported one is the server's to restore (it reports it).
        assert_eq!(p.get("TimeZone"), Some("UTC"));
        let mut q = ClientParams::new(base(), &[("client_encoding".into(), "LATIN1".into())]);
        assert!(q.extra.is_none(), "nothing held for a typical client");
        q.set_setting("search_path", Some("x"));
        assert_eq!(q.value("search_path"), Some("x"));
        q.set_setting("search_path", None);
        assert_eq!(q.value("search_path"), None);
        q.set_setting("search_path", Some("y"));
        q.reset_settings();
        assert!(q.settings().is_empty());
        assert!(q.extra.is_none(), "RESET ALL with no startup settings holds nothing");
    }

    #[test]
    fn set_back_to_default_drops_override() {
        let mut p = ClientParams::new(base(), &[]);
        assert!(p.set("TimeZone", "Asia/Tokyo"));
        assert!(!p.set("TimeZone", "Asia/Tokyo"));
        assert!(p.set("TimeZone", "UTC"));
        assert!(p.overrides.is_empty());
    }

    #[test]
    fn quoting() {
        let mut v = Vec::new();
        quote_ident_path(&mut v, "my\"app.x");
        assert_eq!(v, b"\"my\"\"app\".\"x\"");
        assert_eq!(
            capture_sql(&["a".into(), "b".into()]),
            b"SELECT pg_catalog.current_setting(E'a', true), pg_catalog.current_setting(E'b', true)".to_vec()
        );
    }
}
