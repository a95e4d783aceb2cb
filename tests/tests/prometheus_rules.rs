//! The alerting rules in deploy/prometheus/: Prometheus accepts them, each
//! fires when it must and not for a shorter blip (`promtool test rules`),
//! and every pgferry metric they name is one pgferry really exports (a rule
//! on a metric that does not exist never fires, and nothing says so).

mod common;

use common::*;
use pgferry_tests::citus::shared_citus_or_skip;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const PROMTOOL: &str = "/usr/bin/promtool";
const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/pgferry-alerts.yml");
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

/// The pgferry_* metric names the rules use (histogram suffixes removed).
fn names_in_rules() -> BTreeSet<String> {
    let text = std::fs::read_to_string(RULES).unwrap();
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
    let names = names_in_rules();
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
    let (code, body) = get(http_port(&f), "/metrics").await;
    assert_eq!(code, 200);
    let gone = missing(&body, &names, |n| !n.starts_with("pgferry_citus_metadata"));
    assert!(
        gone.is_empty(),
        "rules use metrics pgferry does not export: {gone:?}\n{body}"
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
        "rules use metrics pgferry does not export: {gone:?}\n{body}"
    );
}
