//! Configuration changes at run time: RELOAD / SIGHUP (re-read the file)
//! and the console's SET (one setting).
//!
//! A new configuration replaces the old one in one step, or not at all: a
//! file that does not parse, a users file or TLS files that do not load,
//! leave everything as it was. Settings that only a restart can apply
//! (sockets already bound, the runtime, the topology source, the control
//! connections) keep their running values, and their names are logged, so
//! that what SHOW CONFIG prints is what runs.

use pgferry_config::Config;
use std::time::Duration;

/// Copies restart-only settings from `old` into `new`; returns the names
/// of those the file changed.
pub fn carry_over(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($name:literal, $($field:tt)+) => {
            if old.$($field)+ != new.$($field)+ {
                changed.push($name);
                new.$($field)+ = old.$($field)+.clone();
            }
        };
    }
    keep!("listen", listen);
    keep!("http", http);
    keep!("topology", topology);
    keep!("runtime.worker_threads", runtime.worker_threads);
    keep!("limits.max_client_conn", limits.max_client_conn);
    keep!("limits.max_pending_logins", limits.max_pending_logins);
    keep!(
        "limits.max_pending_logins_per_address",
        limits.max_pending_logins_per_address
    );
    keep!("limits.auth_failure_limit", limits.auth_failure_limit);
    keep!("limits.auth_failure_window", limits.auth_failure_window);
    keep!("limits.auth_failure_delay", limits.auth_failure_delay);
    keep!("auth.auth_user", auth.auth_user);
    keep!("auth.auth_query", auth.auth_query);
    keep!("auth.auth_dbname", auth.auth_dbname);
    keep!("tls.client_tls", tls.client_tls);
    keep!("tls.client_ca_file", tls.client_ca_file);
    keep!("tls.client_cert", tls.client_cert);
    keep!("tls.min_version", tls.min_version);
    keep!("tls.server_tls", tls.server_tls);
    keep!("tls.server_ca_file", tls.server_ca_file);
    keep!("tls.server_cert_file", tls.server_cert_file);
    keep!("tls.server_key_file", tls.server_key_file);
    keep!("pool.ro_fallback_to_primary", pool.ro_fallback_to_primary);
    changed
}

/// One row of SHOW CONFIG: PgBouncer's name, the value, the default, and
/// whether SET can change it.
pub struct Setting {
    pub key: &'static str,
    pub value: String,
    pub default: String,
    pub changeable: bool,
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s}")
    }
}

/// Every setting SHOW CONFIG prints, PgBouncer's names where they exist.
pub fn settings(c: &Config) -> Vec<Setting> {
    let d = defaults();
    type Row = (&'static str, fn(&Config) -> String, bool);
    let rows: Vec<Row> = vec![
        ("listen_rw", |c| c.listen.rw.to_string(), false),
        (
            "listen_ro",
            |c| c.listen.ro.map(|a| a.to_string()).unwrap_or_default(),
            false,
        ),
        ("max_client_conn", |c| c.limits.max_client_conn.to_string(), false),
        ("client_login_timeout", |c| secs(c.limits.client_login_timeout), true),
        ("client_idle_timeout", |c| secs(c.limits.client_idle_timeout), true),
        (
            "idle_transaction_timeout",
            |c| secs(c.limits.idle_transaction_timeout),
            true,
        ),
        ("max_packet_size", |c| c.limits.max_message_size.to_string(), true),
        ("pool_mode", |c| c.pool.pool_mode.as_str().into(), true),
        ("default_pool_size", |c| c.pool.pool_size.to_string(), true),
        ("min_pool_size", |c| c.pool.min_pool_size.to_string(), true),
        ("reserve_pool_size", |c| c.pool.reserve_pool_size.to_string(), true),
        ("reserve_pool_timeout", |c| secs(c.pool.reserve_pool_timeout), true),
        ("max_db_connections", |c| c.pool.max_db_connections.to_string(), true),
        (
            "max_user_connections",
            |c| c.pool.max_user_connections.to_string(),
            true,
        ),
        ("query_wait_timeout", |c| secs(c.pool.query_wait_timeout), true),
        ("server_connect_timeout", |c| secs(c.pool.server_connect_timeout), true),
        ("server_lifetime", |c| secs(c.pool.server_lifetime), true),
        ("server_idle_timeout", |c| secs(c.pool.server_idle_timeout), true),
        ("server_reset_query", |c| c.pool.server_reset_query.clone(), true),
        (
            "max_prepared_statements",
            |c| c.pool.max_prepared_statements.to_string(),
            true,
        ),
        ("stats_period", |c| secs(c.runtime.stats_period), true),
        ("shutdown_timeout", |c| secs(c.runtime.shutdown_timeout), true),
        ("park_idle_after", |c| secs(c.runtime.park_idle_after), true),
        ("admin_users", |c| c.auth.admin_users.join(","), true),
        ("stats_users", |c| c.auth.stats_users.join(","), true),
    ];
    rows.into_iter()
        .map(|(key, get, changeable)| Setting {
            key,
            value: get(c),
            default: get(&d),
            changeable,
        })
        .collect()
}

/// The built-in defaults (a minimal file), for SHOW CONFIG's default column.
fn defaults() -> Config {
    Config::from_toml("[topology]\nsource = \"static\"\nprimary = \"127.0.0.1:5432\"\n[auth]\nmethod = \"trust\"\n")
        .expect("the minimal configuration is valid")
}

/// Applies `SET key = value` to a copy of `c`. Durations are seconds (as
/// PgBouncer's) or humantime ("250ms", "2min").
pub fn set(c: &Config, key: &str, value: &str) -> Result<Config, String> {
    let mut n = c.clone();
    let v = value.trim().trim_matches('\'');
    let num = || {
        v.parse::<usize>()
            .map_err(|_| format!("invalid value for {key}: {value}"))
    };
    let dur = || -> Result<Duration, String> {
        let d = match v.parse::<f64>() {
            Ok(s) => Duration::try_from_secs_f64(s).map_err(|_| format!("invalid duration for {key}: {value}"))?,
            _ => humantime::parse_duration(v).map_err(|_| format!("invalid duration for {key}: {value}"))?,
        };
        pgferry_config::check_duration(d).map_err(|e| format!("{key}: {e}"))
    };
    let list = || -> Vec<String> {
        v.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    match key.to_ascii_lowercase().as_str() {
        "client_login_timeout" => n.limits.client_login_timeout = dur()?,
        "client_idle_timeout" => n.limits.client_idle_timeout = dur()?,
        "idle_transaction_timeout" => n.limits.idle_transaction_timeout = dur()?,
        "max_packet_size" => n.limits.max_message_size = num()?.max(1024),
        "pool_mode" => {
            n.pool.pool_mode = match v {
                "transaction" => pgferry_config::PoolMode::Transaction,
                "session" => pgferry_config::PoolMode::Session,
                _ => return Err(format!("invalid pool_mode: {value} (transaction | session)")),
            }
        }
        "default_pool_size" => n.pool.pool_size = num()?.max(1),
        "min_pool_size" => n.pool.min_pool_size = num()?,
        "reserve_pool_size" => n.pool.reserve_pool_size = num()?,
        "reserve_pool_timeout" => n.pool.reserve_pool_timeout = dur()?,
        "max_db_connections" => n.pool.max_db_connections = num()?,
        "max_user_connections" => n.pool.max_user_connections = num()?,
        "query_wait_timeout" => n.pool.query_wait_timeout = dur()?,
        "server_connect_timeout" => n.pool.server_connect_timeout = dur()?,
        "server_lifetime" => n.pool.server_lifetime = dur()?,
        "server_idle_timeout" => n.pool.server_idle_timeout = dur()?,
        "server_reset_query" => n.pool.server_reset_query = v.to_owned(),
        "max_prepared_statements" => n.pool.max_prepared_statements = num()?,
        "stats_period" => n.runtime.stats_period = dur()?.max(Duration::from_secs(1)),
        "shutdown_timeout" => n.runtime.shutdown_timeout = dur()?,
        "park_idle_after" => n.runtime.park_idle_after = dur()?,
        "admin_users" => n.auth.admin_users = list(),
        "stats_users" => n.auth.stats_users = list(),
        other => {
            return Err(match settings(c).iter().find(|s| s.key == other) {
                Some(_) => format!("{other} cannot be changed at run time: edit the file and restart"),
                None => format!("unknown setting: {other}"),
            })
        }
    }
    n.validate().map_err(|e| e.join("; "))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!(
            "[topology]\nsource = \"static\"\nprimary = \"127.0.0.1:5432\"\n[auth]\nmethod = \"trust\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn restart_only_settings_keep_their_running_values() {
        let old = config("[listen]\nrw = \"127.0.0.1:6000\"\n[pool]\npool_size = 5\n");
        let mut new = config("[listen]\nrw = \"127.0.0.1:7000\"\n[pool]\npool_size = 9\n");
        assert_eq!(carry_over(&old, &mut new), vec!["listen"]);
        assert_eq!(new.listen.rw.port(), 6000);
        assert_eq!(new.pool.pool_size, 9, "reloadable settings take the new value");
    }

    #[test]
    fn set_parses_values_and_refuses_what_it_cannot_change() {
        let c = config("");
        let n = set(&c, "default_pool_size", "7").unwrap();
        assert_eq!(n.pool.pool_size, 7);
        let n = set(&n, "query_wait_timeout", "2.5").unwrap();
        assert_eq!(n.pool.query_wait_timeout, Duration::from_millis(2500));
        // Out of range: refused, never a panic or a deadline that overflows.
        for bad in ["1e20", "1e19", "-1", "NaN", "inf", "400000days"] {
            let e = set(&n, "client_idle_timeout", bad).unwrap_err();
            assert!(e.contains("client_idle_timeout"), "{bad}: {e}");
        }
        let n = set(&n, "server_idle_timeout", "'90s'").unwrap();
        assert_eq!(n.pool.server_idle_timeout, Duration::from_secs(90));
        assert!(set(&c, "default_pool_size", "x").unwrap_err().contains("invalid"));
        assert!(set(&c, "listen_rw", "1").unwrap_err().contains("restart"));
        assert!(set(&c, "nope", "1").unwrap_err().contains("unknown"));
        let s = settings(&n);
        let row = s.iter().find(|s| s.key == "default_pool_size").unwrap();
        assert_eq!(
            (row.value.as_str(), row.default.as_str(), row.changeable),
            ("7", "20", true)
        );
    }
}
