//! Pool sizing and expiry settings, observed from PostgreSQL's side
//! (pg_stat_activity), with each test on its own database user so that the
//! counts are not disturbed by other tests.

mod common;

use common::*;
use pgferry_tests::wait_for;
use std::time::{Duration, Instant};

/// Server connections PostgreSQL has for `user`.
fn server_conns(user: &str) -> usize {
    primary_sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND backend_type = 'client backend'"
    ))
    .parse()
    .unwrap()
}

/// A user of its own, with a database it may connect to.
fn make_user(name: &str) {
    // Concurrent GRANTs on one database fail with "tuple concurrently updated".
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = pgferry_tests::shared_cluster();
    let exists = c
        .psql_primary(
            "postgres",
            &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{name}'"),
        )
        .unwrap();
    if exists == "0" {
        c.create_user(name, "pw-pw").unwrap();
        c.psql_primary("postgres", &format!("GRANT CONNECT ON DATABASE app TO {name}"))
            .unwrap();
    }
}

/// pgferry in front of the shared cluster, with `user` in its users file.
fn ferry_for(user: &str, pool: &str) -> pgferry_tests::Ferry {
    make_user(user);
    let cluster = pgferry_tests::shared_cluster();
    let users = std::env::temp_dir().join(format!("pgferry-userlist-{user}-{}", std::process::id()));
    cluster.write_userlist(&users, &["app", user]).unwrap();
    let cfg = format!(
        "{pool}\n[auth]\nusers_file = {:?}\n[[user]]\nname = \"{user}\"\nserver_password = \"pw-pw\"\n",
        users.to_string_lossy()
    );
    pgferry_tests::Ferry::for_cluster(cluster, &cfg).expect("start pgferry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_and_server_idle_timeout() {
    let user = "pool_min";
    let f = ferry_for(
        user,
        "[pool]\npool_size = 4\nmin_pool_size = 2\nserver_idle_timeout = \"1s\"\n",
    );
    // Four connections in use at once...
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| connect(&f, user, "pw-pw"))).await;
    futures_util::future::join_all(clients.iter().map(|c| c.query_one("SELECT pg_sleep(0.3)::text", &[]))).await;
    assert_eq!(server_conns(user), 4);
    // ... idle ones above min_pool_size close after server_idle_timeout.
    wait_for(
        "idle connections to expire down to min_pool_size",
        Duration::from_secs(10),
        || server_conns(user) == 2,
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server_conns(user), 2, "min_pool_size connections stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_replaces_old_connections() {
    let user = "pool_life";
    let f = ferry_for(user, "[pool]\npool_size = 1\nserver_lifetime = \"1s\"\n");
    let c = connect(&f, user, "pw-pw").await;
    let pid1: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid2: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_ne!(pid1, pid2, "a connection older than server_lifetime is not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_pool_serves_clients_that_waited() {
    let user = "pool_reserve";
    let f = ferry_for(
        user,
        "[pool]\npool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = \"300ms\"\nquery_wait_timeout = \"5s\"\n",
    );
    let holder = connect(&f, user, "pw-pw").await;
    holder.batch_execute("BEGIN").await.unwrap();
    let waiter = connect(&f, user, "pw-pw").await;
    let t = Instant::now();
    waiter.query_one("SELECT 1", &[]).await.unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(server_conns(user), 2, "one reserve connection opened");
    holder.batch_execute("COMMIT").await.unwrap();
}
