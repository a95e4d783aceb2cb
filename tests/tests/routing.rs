//! The read-only port goes to the standby; without standbys it falls back
//! to the primary only if configured to.

mod common;

use common::*;

async fn in_recovery(conn_str: &str) -> Result<bool, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let r = c.query_one("SELECT pg_is_in_recovery()", &[]).await?;
    Ok(r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_port_is_the_primary_and_read_only_port_the_standby() {
    let f = ferry("");
    assert!(!in_recovery(&f.rw_conn_str("app", APP_PASS, "app")).await.unwrap());
    assert!(in_recovery(&f.ro_conn_str("app", APP_PASS, "app")).await.unwrap());
    // A write on the read-only port fails as PostgreSQL says.
    let (c, conn) = tokio_postgres::connect(&f.ro_conn_str("app", APP_PASS, "app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let e = c.batch_execute("CREATE TABLE ro_write (a int)").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "25006");
    // in_hot_standby as the client sees it describes the standby.
    let hs: String = c.query_one("SHOW in_hot_standby", &[]).await.unwrap().get(0);
    assert_eq!(hs, "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_port_without_standbys() {
    let f = ferry("[topology]\nstandbys = []\n[pool]\nro_fallback_to_primary = true\n");
    assert!(!in_recovery(&f.ro_conn_str("app", APP_PASS, "app")).await.unwrap());
    let f = ferry("[topology]\nstandbys = []\n[pool]\nro_fallback_to_primary = false\n");
    let e = in_recovery(&f.ro_conn_str("app", APP_PASS, "app")).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57P03");
}
