//! The alerting rules in deploy/prometheus/: Prometheus accepts them, each
//! fires when it must and not for a shorter blip (`promtool test rules`),
//! and every pgferry metric they name is one pgferry really exports (a rule
//! on a metric that does not exist never fires, and nothing says so).
//! The Grafana dashboard in deploy/grafana/ the same way: its JSON has the
//! shape Grafana imports, every query is PromQL that Prometheus parses, and
//! every metric it charts is exported.

mod common;

use common::*;
use pgferry_tests::citus::shared_citus_or_skip;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const PROMTOOL: &str = "/usr/bin/promtool";
const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/pgferry-alerts.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/pgferry-dashboard.json");
const RULE_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/prometheus/pgferry-alerts.test.yml"
);

fn promtool(args: &[&str]) -> String {
    assert!(
        Path::new(PROMTOOL).exists(),
        "promtool missing: apt-get install prometheus (.ci/run does)"
    );
    let out = Command::new(PROMTOOL).args(args).output().expect("promtool runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_and_unit_tests_pass() {
    let out = promtool(&["check", "rules", RULES]);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", RULE_TESTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The pgferry_* metric names the rules and the dashboard use (histogram
/// suffixes removed).
fn names_used() -> BTreeSet<String> {
    let mut names = names_in(RULES);
    names.extend(names_in(DASHBOARD));
    names
}

fn names_in(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("pgferry_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let name = name.strip_suffix("_bucket").unwrap_or(&name).to_owned();
        // Alert names (PgferryX) are not metrics; metric names are lower case.
        if name.len() > "pgferry_".len() {
            names.insert(name);
        }
    }
    assert!(names.len() >= 8, "{names:?}");
    names
}

fn missing(body: &str, names: &BTreeSet<String>, which: impl Fn(&str) -> bool) -> Vec<String> {
    names
        .iter()
        .filter(|n| which(n))
        .filter(|n| !body.contains(&format!("# HELP {n} ")))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_use_is_exported() {
    let names = names_used();
    // A certificate expiring at a known time: the expiry gauge says it.
    let dir = std::env::temp_dir().join(format!("pgferry-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2031, 3, 4);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let f = ferry(&format!("[tls]\ncert_file = {c:?}\nkey_file = {k:?}\n"));
    // One transaction, so that a pool (and its labelled metrics) exists.
    app(&f).await.simple_query("SELECT 1").await.unwrap();
    let (code, body) = get(http_port(&f), "/metrics").await;
    assert_eq!(code, 200);
    // The Citus metrics other than group leaders exist only where Citus is.
    let gone = missing(&body, &names, |n| {
        !n.starts_with("pgferry_citus") || n == "pgferry_citus_group_leader"
    });
    assert!(
        gone.is_empty(),
        "rules or dashboard use metrics pgferry does not export: {gone:?}\n{body}"
    );
    let unknown = dashboard_labels_not_exported(&body);
    assert!(
        unknown.is_empty(),
        "the dashboard groups or labels by labels pgferry does not export: {unknown:?}"
    );
    assert!(
        body.contains("\npgferry_tls_cert_not_after_seconds 1930348800\n"),
        "the certificate's notAfter (2031-03-04):\n{body}"
    );
    assert!(body.contains("\npgferry_topology_leader_confirmed 1\n"), "{body}");

    // The Citus ones, from a pgferry in front of Citus.
    let Some(cluster) = shared_citus_or_skip() else {
        return;
    };
    let f = cluster.ferry("").expect("start pgferry");
    let (_, body) = get(http_port(&f), "/metrics").await;
    let gone = missing(&body, &names, |n| n.starts_with("pgferry_citus"));
    assert!(
        gone.is_empty(),
        "rules or dashboard use metrics pgferry does not export: {gone:?}\n{body}"
    );
}

/// The dashboard as Grafana imports it: the fields an import needs, panels
/// with unique ids laid out on the 24-column grid without overlapping, every
/// query on the `datasource` variable, and every query PromQL that
/// `promtool` parses (checked as recording rules, `$instance` filled in).
#[test]
fn grafana_dashboard_is_importable_and_its_queries_parse() {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    for key in ["uid", "title", "schemaVersion", "panels", "templating", "time"] {
        assert!(d.get(key).is_some(), "dashboard lacks {key}");
    }
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(vars.contains(&"datasource") && vars.contains(&"instance"), "{vars:?}");

    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut exprs = Vec::new();
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 20, "{} panels", panels.len());
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let kind = p["type"].as_str().unwrap();
        assert!(
            ["row", "timeseries", "stat", "table"].contains(&kind),
            "panel {id}: type {kind}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(w >= 1 && h >= 1 && x + w <= 24, "panel {id} off the grid: {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "panel {id} overlaps another at ({cx}, {cy})");
            }
        }
        if kind == "row" {
            continue;
        }
        assert!(
            !p["title"].as_str().unwrap_or_default().is_empty(),
            "panel {id} has no title"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {id}");
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            exprs.push(e.to_owned());
        }
    }

    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e.replace("$instance", ".*").replace("$__rate_interval", "1m");
        assert!(!e.contains('$'), "an unfilled variable in {e}");
        rules.push_str(&format!(
            "      - record: pgferry:dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let path = std::env::temp_dir().join(format!("pgferry-dashboard-{}.yml", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    let out = promtool(&["check", "rules", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(out.contains(&format!("SUCCESS: {} rules found", exprs.len())), "{out}");
}

/// Labels the dashboard uses (`by (...)`, `{{label}}` in legends) that no
/// pgferry metric in `body` carries (Prometheus adds instance and job; the
/// Citus-only ones are checked where Citus runs).
fn dashboard_labels_not_exported(body: &str) -> BTreeSet<String> {
    let mut exported: BTreeSet<String> = ["instance", "job", "le"].iter().map(|s| s.to_string()).collect();
    for line in body.lines().filter(|l| l.starts_with("pgferry_")) {
        if let Some(labels) = line
            .split_once('{')
            .and_then(|(_, r)| r.split_once('}'))
            .map(|(l, _)| l)
        {
            for pair in labels.split("\",") {
                if let Some((k, _)) = pair.split_once('=') {
                    exported.insert(k.trim_start_matches(',').to_owned());
                }
            }
        }
    }
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            for (i, _) in expr.match_indices("by (") {
                let inner = &expr[i + 4..];
                let inner = &inner[..inner.find(')').unwrap()];
                used.extend(inner.split(',').map(|l| l.trim().to_owned()));
            }
            let legend = t["legendFormat"].as_str().unwrap_or_default();
            for part in legend.split("{{").skip(1) {
                used.insert(part.split("}}").next().unwrap().trim().to_owned());
            }
        }
    }
    // group (Citus worker groups) and target (Citus routing) are exported
    // only in front of Citus.
    used.into_iter()
        .filter(|l| !exported.contains(l) && l != "group" && l != "target")
        .collect()
}
