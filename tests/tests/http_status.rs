//! The HTTP listener: /metrics parsed by the Prometheus Python client's
//! own exposition-format parser (a real parser, not a regex), /health,
//! /ready, and the HTML status page with its pools table.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_ready_and_status_page() {
    let f = ferry("");
    let port = http_port(&f);
    let c = app(&f).await;
    for _ in 0..3 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    // A failed login shows in the counters.
    let bad = tokio_postgres::connect(&f.rw_conn_str("app", "wrong", "app"), tokio_postgres::NoTls).await;
    assert!(bad.is_err());

    let (code, body) = get(port, "/metrics").await;
    assert_eq!(code, 200);
    // The Prometheus client's parser reads every family, or fails.
    let mut py = Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\n\
             fams = list(p(sys.stdin.read()))\nprint(len(fams))\n\
             for f in fams:\n    for s in f.samples:\n        print(s.name, dict(sorted(s.labels.items())), s.value)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    let parsed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: usize = parsed.lines().next().unwrap().parse().unwrap();
    assert!(families >= 20, "{parsed}");
    let sample = |name: &str| {
        parsed
            .lines()
            .find(|l| {
                l.starts_with(&format!("{name} ")) && l.contains("'database': 'app'") && l.contains("'port': 'rw'")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{parsed}"))
    };
    assert_eq!(sample("pgferry_pool_clients_active"), 1.0);
    assert!(sample("pgferry_pool_transactions_total") >= 3.0);
    // Latency histograms: every transaction observed, +Inf bucket = count.
    let xacts = sample("pgferry_pool_transaction_seconds_count");
    assert!(xacts >= 3.0, "{parsed}");
    assert!(sample("pgferry_pool_query_seconds_sum") > 0.0);
    let inf = parsed
        .lines()
        .find(|l| {
            l.starts_with("pgferry_pool_transaction_seconds_bucket ")
                && l.contains("'le': '+Inf'")
                && l.contains("'port': 'rw'")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(inf, Some(xacts), "{parsed}");
    assert!(
        parsed
            .lines()
            .any(|l| l.starts_with("pgferry_topology_leader {") && l.ends_with(" 1")),
        "{parsed}"
    );
    let value = |prefix: &str| {
        parsed
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{prefix} missing:\n{parsed}"))
    };
    assert_eq!(value("pgferry_auth_failures_total {'reason': 'password'} "), 1.0);
    assert_eq!(value("pgferry_auth_failures_total {'reason': 'hba'} "), 0.0);
    assert_eq!(value("pgferry_topology_leader_confirmed {} "), 1.0);
    assert!(value("pgferry_process_open_fds {} ") > 0.0);
    assert!(value("pgferry_process_resident_memory_bytes {} ") > 1e6);

    assert_eq!(get(port, "/health").await.0, 200);
    assert_eq!(get(port, "/ready").await.0, 200);
    assert_eq!(get(port, "/nope").await.0, 404);
    let (code, page) = get(port, "/").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("<table id=\"pools\">") && page.contains("<td class=l>app</td>"),
        "{page}"
    );
    assert!(page.contains("http-equiv=\"refresh\""), "the page refreshes itself");
    for table in ["latency", "servers", "events", "topology"] {
        assert!(page.contains(&format!("<table id=\"{table}\">")), "{table}: {page}");
    }
    assert!(page.contains("started: leader "), "the start is a recent event: {page}");
    assert!(page.contains("<td class=l>xact</td>"), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external assets"
    );
}
