//! tokio-postgres helpers the end-to-end tests share.

use tokio_postgres::{Client, Error, NoTls};

/// Connects without TLS and drives the connection on a task of its own.
pub async fn connect(conn_str: &str) -> Result<Client, Error> {
    let (client, conn) = tokio_postgres::connect(conn_str, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The pid of the server process that serves `c`'s next transaction.
pub async fn backend_pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0)
}

/// Whether `c`'s next transaction runs on a standby.
pub async fn in_recovery(c: &Client) -> bool {
    c.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0)
}
