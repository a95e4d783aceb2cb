//! Transaction boundaries: giving the server connection back (with the
//! bookkeeping a transaction leaves), pgferry's own short queries, and
//! leaving the connection clean when the client goes.

use super::*;
use pgferry_pool::stats::Total;

impl Session {
    // ---- transaction boundaries ----

    /// In transaction mode, returns the server to the pool at the end of a
    /// transaction unless session state pins it.
    pub(super) async fn maybe_release(&mut self) {
        if self.mode == PoolMode::Session || self.server.is_none() {
            return;
        }
        if !self.replies.releasable() || !self.to_server.is_empty() {
            return;
        }
        let mut conn = self.server.take().expect("bound");
        let work = self.reset_all
            || self.forget_server_statements
            || !self.capture.is_empty()
            || (self.pin.is_some() && self.recheck_pin);
        if work {
            let done = Box::pin(self.end_of_transaction(&mut conn)).await;
            // Time passed while the internal query ran: a fresh reading.
            self.clock = None;
            if done.is_err() {
                self.client.entry.clear_target();
                conn.discard("internal query failed");
                return;
            }
        }
        if self.pin.is_some() {
            self.server = Some(conn);
            return;
        }
        self.client.entry.clear_target();
        let now = self.now();
        let took = now.saturating_duration_since(self.bound_at);
        let stats = &self.pool.stats;
        stats.add(Total::XactCount, 1);
        stats.add(Total::XactTime, took.as_micros() as u64);
        self.pool.latency.record(LatencyKind::Xact, took);
        tracing::trace!(client = self.id, "server released");
        conn.checkin_at(now);
        self.hot = self
            .released_at
            .is_some_and(|t| now.saturating_duration_since(t) < HOT_GAP);
        self.released_at = Some(now);
    }

    /// Bookkeeping when a transaction ends: settings it changed, statements
    /// the server dropped, and whether pinned state is gone.
    pub(super) async fn end_of_transaction(&mut self, conn: &mut ServerConn) -> Result<(), PoolError> {
        if std::mem::take(&mut self.reset_all) {
            self.params.reset_settings();
            conn.replace_settings(Vec::new());
            // The client's startup settings go back on at the next sync.
        }
        if std::mem::take(&mut self.forget_server_statements) {
            conn.statements.clear();
        }
        if !self.capture.is_empty() {
            let mut names = std::mem::take(&mut self.capture);
            names.retain(|n| !self.params.is_reported(n));
            names.sort();
            names.dedup();
            if !names.is_empty() {
                let row = self.internal_query(conn, &params::capture_sql(&names)).await?;
                for (i, name) in names.iter().enumerate() {
                    let value = row.get(i).and_then(|v| v.as_deref());
                    self.params.set_setting(name, value);
                    conn.set_setting(name, value);
                }
            }
        }
        if self.pin.is_some() && std::mem::take(&mut self.recheck_pin) && self.pin != Some(Pin::DynamicSetting) {
            let row = self.internal_query(conn, params::PIN_PROBE_SQL).await?;
            if row.first().and_then(|v| v.as_deref()) == Some("0") {
                tracing::info!(client = self.id, "session state released; client unpinned");
                self.pin = None;
            }
        }
        Ok(())
    }

    /// Runs pgferry's own query on an in-sync connection and returns the
    /// first row. ParameterStatus changes it causes are tracked and passed on.
    pub(super) async fn internal_query(
        &mut self,
        conn: &mut ServerConn,
        sql: &[u8],
    ) -> Result<Vec<Option<String>>, PoolError> {
        let mut q = BytesMut::with_capacity(sql.len() + 6);
        encode::query(&mut q, sql);
        let work = async {
            conn.wire.write_all(&q).await?;
            let mut row: Option<Vec<Option<String>>> = None;
            let mut error: Option<PoolError> = None;
            loop {
                let f = conn.wire.read_frame().await?;
                match f.tag {
                    backend::PARAMETER_STATUS => {
                        let (name, value) = backend::parameter_status(f.body())?;
                        conn.set_param(name, value);
                        if self.params.set(name, value) {
                            self.to_client.extend_from_slice(&f.bytes);
                        }
                    }
                    backend::NOTIFICATION_RESPONSE => self.to_client.extend_from_slice(&f.bytes),
                    backend::DATA_ROW if row.is_none() => row = Some(data_row(f.body())?),
                    backend::ERROR_RESPONSE => {
                        let e = backend::error_fields(f.body())?;
                        error = Some(PoolError::Server {
                            severity: e.severity.to_owned(),
                            code: e.code.to_owned(),
                            message: e.message.to_owned(),
                        });
                    }
                    backend::READY_FOR_QUERY => {
                        return match error {
                            Some(e) => Err(e),
                            None => Ok(row.unwrap_or_default()),
                        }
                    }
                    _ => {}
                }
            }
        };
        let r = tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, work)
            .await
            .unwrap_or(Err(PoolError::Closed));
        if let Err(e) = &r {
            tracing::warn!(client = self.id, server = conn.id, error = %e, "internal query failed");
        }
        r
    }

    /// The client is gone: leave the server clean for the next client, or
    /// close it.
    pub(super) async fn release_on_exit(&mut self) {
        self.client.entry.clear_target();
        let Some(mut conn) = self.server.take() else {
            return;
        };
        if self.replies.pending() || !self.to_server.is_empty() {
            // A query is running: cancel it so that its locks go now, and
            // close the connection, which rolls the transaction back.
            let t = CancelTarget {
                addr: conn.addr.clone(),
                pid: conn.backend_pid,
                key: conn.backend_key,
                server: conn.id,
                server_created: conn.created,
            };
            let tls = self.shared.pools.server_tls.clone();
            tokio::spawn(async move {
                let _ = crate::clients::send_cancel(&t, &tls).await;
            });
            tracing::info!(
                client = self.id,
                server = conn.id,
                "client left mid-query; server connection closed"
            );
            conn.discard("client disconnected during a query");
            return;
        }
        if !self.replies.at_boundary() {
            // Mid-pipeline (no Sync yet, or skipping to one): a Sync would
            // commit the group's implicit transaction. Closing rolls it back.
            conn.discard("client left in the middle of a pipeline");
            return;
        }
        let mut steps: Vec<&[u8]> = Vec::new();
        if self.replies.status() != TxStatus::Idle {
            steps.push(b"ROLLBACK");
        }
        let reset = self.pool.settings.server_reset_query.clone();
        if self.pin.is_some() {
            steps.push(b"DISCARD ALL");
        } else if self.mode == PoolMode::Session && !reset.is_empty() {
            steps.push(reset.as_bytes());
        }
        // What the reset did to the session, from the same scanner that
        // reads clients' SQL (a custom server_reset_query included).
        let mut forget_statements = false;
        let mut forget_settings = false;
        for sql in steps {
            let fx = sql::scan(sql);
            forget_statements |= fx.discard_all || fx.deallocate == Some(None);
            forget_settings |= fx.reset_all;
            if self.internal_query(&mut conn, sql).await.is_err() {
                conn.discard("reset after client left failed");
                return;
            }
        }
        if forget_statements {
            conn.statements.clear();
        }
        if forget_settings {
            conn.replace_settings(Vec::new());
        }
        conn.checkin();
    }
}

/// Text values of a DataRow.
fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, ProtocolError> {
    let mut r = pgferry_protocol::frame::Reader::new(body, "DataRow");
    let n = r.i16()?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(String::from_utf8_lossy(r.bytes(len as usize)?).into_owned()));
        }
    }
    Ok(out)
}
