//! The read-only port goes to the standby; without standbys it falls back
//! to the primary only if configured to.

mod common;

use common::*;

use pgferry_tests::{connect, in_recovery};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_port_is_the_primary_and_read_only_port_the_standby() {
    let f = ferry("");
    let rw = connect(&f.rw_conn_str("app", APP_PASS, "app")).await.unwrap();
    assert!(!in_recovery(&rw).await);
    let c = connect(&f.ro_conn_str("app", APP_PASS, "app")).await.unwrap();
    assert!(in_recovery(&c).await);
    // A write on the read-only port fails as PostgreSQL says.
    let e = c.batch_execute("CREATE TABLE ro_write (a int)").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "25006");
    // in_hot_standby as the client sees it describes the standby.
    let hs: String = c.query_one("SHOW in_hot_standby", &[]).await.unwrap().get(0);
    assert_eq!(hs, "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_port_without_standbys() {
    let f = ferry("[topology]\nstandbys = []\n[pool]\nro_fallback_to_primary = true\n");
    let ro = connect(&f.ro_conn_str("app", APP_PASS, "app")).await.unwrap();
    assert!(!in_recovery(&ro).await);
    let f = ferry("[topology]\nstandbys = []\n[pool]\nro_fallback_to_primary = false\n");
    let e = connect(&f.ro_conn_str("app", APP_PASS, "app")).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57P03");
}
