//! Server messages to the client, through the reply matcher, and what the
//! client is told when the server connection is lost.

use super::*;
use pgferry_pool::stats::Total;

/// The most to_client reserves at a transaction's first reply.
const TO_CLIENT_FIRST: usize = 8192;

impl Session {
    // ---- server → client ----

    pub(super) fn on_server_data(&mut self) {
        // The replies go to to_client, which a client between transactions
        // holds empty and without capacity: room for what was read, at
        // once, instead of growing it reply by reply.
        if let Some(srv) = self.server.as_deref() {
            if self.to_client.capacity() == 0 {
                self.to_client.reserve(srv.wire.rbuf.len().min(TO_CLIENT_FIRST));
            }
        }
        loop {
            let Some(srv) = self.server.as_deref_mut() else {
                return;
            };
            match decode_frame(&mut srv.wire.rbuf, self.max_message) {
                Ok(Some(frame)) => {
                    if let Err(e) = self.on_server_frame(frame) {
                        return self.server_lost(e);
                    }
                }
                Ok(None) => return,
                Err(e) => return self.server_lost(e.into()),
            }
        }
    }

    pub(super) fn on_server_frame(&mut self, frame: Frame) -> Result<(), PoolError> {
        tracing::trace!(client = self.id, tag = %(frame.tag as char), len = frame.len(), "from server");
        let mut frame = frame;
        if frame.tag == backend::ERROR_RESPONSE {
            let e = backend::error_fields(frame.body())?;
            if matches!(e.severity, "FATAL" | "PANIC") {
                // The server connection is ending, not the client's: keep
                // the reason for server_lost, which reports it as an ERROR.
                self.server_fatal = Some(Box::new((e.code.to_owned(), e.message.to_owned())));
                return Ok(());
            }
            if self.rewrite {
                if let Some(f) = self.client_names_in_error(&frame) {
                    frame = f;
                }
            }
        }
        match self.replies.received(&frame, &mut self.to_client) {
            Ok(Received::ParameterStatus) => {
                let (name, value) = backend::parameter_status(frame.body())?;
                if self.read_only && name == "default_transaction_read_only" && value == "off" {
                    // Something the guard's text scan missed (SQL built at
                    // run time) turned it off: this connection is no longer
                    // safe for a read-only user. Closing it rolls back.
                    return Err(PoolError::LeftReadOnly);
                }
                self.server.as_deref_mut().expect("bound").set_param(name, value);
                if self.params.set(name, value) {
                    self.to_client.extend_from_slice(&frame.bytes);
                }
            }
            Ok(Received::Ready(_)) => self.query_done(),
            Ok(Received::Reply) => {}
            Err(e) => return Err(PoolError::Protocol(e.into())),
        }
        self.apply_fates();
        Ok(())
    }

    /// An error that names pgferry's statement (`pgferry_7`) where the
    /// client knows its own name (`s1`), rewritten with the client's name.
    /// Rare: only errors that quote a statement name pay for the scan.
    pub(super) fn client_names_in_error(&self, frame: &Frame) -> Option<Frame> {
        const PREFIX: &[u8] = b"\"pgferry_";
        let body = frame.body();
        body.windows(PREFIX.len()).position(|w| w == PREFIX)?;
        let mut out = BytesMut::with_capacity(frame.len() + 64);
        let mut changed = false;
        encode::message(&mut out, backend::ERROR_RESPONSE, |b| {
            let mut fields = body;
            while let [code, rest @ ..] = fields {
                if *code == 0 {
                    break;
                }
                let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
                let mut value = rest[..end].to_vec();
                for (client, stmt) in &self.statements {
                    let server = format!("\"{}\"", String::from_utf8_lossy(&stmt.name));
                    let mine = format!("\"{}\"", String::from_utf8_lossy(client));
                    if let Some(v) = replace_all(&value, server.as_bytes(), mine.as_bytes()) {
                        value = v;
                        changed = true;
                    }
                }
                b.put_u8(*code);
                b.put_slice(&value);
                b.put_u8(0);
                fields = rest.get(end + 1..).unwrap_or(&[]);
            }
            b.put_u8(0);
        });
        changed.then(|| Frame {
            tag: backend::ERROR_RESPONSE,
            bytes: out.freeze(),
        })
    }

    /// A client request got its ReadyForQuery: one query, as PgBouncer
    /// counts them. Pipelined requests are timed from the previous reply.
    pub(super) fn query_done(&mut self) {
        let now = self.now();
        if let Some(start) = self.query_start.take() {
            let d = now.saturating_duration_since(start);
            self.pool.stats.add(Total::QueryCount, 1);
            self.pool.stats.add(Total::QueryTime, d.as_micros() as u64);
            self.pool.latency.record(LatencyKind::Query, d);
        }
        if self.replies.pending() {
            self.query_start = Some(now);
        }
    }

    /// The server connection failed while bound: tell the client what it
    /// lost, in protocol order, and carry on without it.
    pub(super) fn server_lost(&mut self, e: PoolError) {
        let Some(conn) = self.server.take() else {
            return;
        };
        tracing::warn!(client = self.id, server = conn.id, error = %e, "server connection lost");
        conn.discard("connection lost");
        self.client.entry.clear_target();
        // Say "rolled back" only when it is certain: nothing that could
        // have committed was in flight.
        let fatal = self.server_fatal.take().map(|b| *b);
        let (code, msg) = if self.replies.executing() {
            let why = fatal.map_or(String::new(), |(_, m)| format!(" ({m})"));
            (
                sqlstate::TRANSACTION_RESOLUTION_UNKNOWN.to_owned(),
                format!("server connection lost while a request was running{why}: whether it took effect is unknown"),
            )
        } else {
            match fatal {
                Some((code, m)) => (
                    code,
                    format!("server connection lost ({m}); the transaction was rolled back"),
                ),
                None => (
                    sqlstate::CONNECTION_FAILURE.to_owned(),
                    "server connection lost; the transaction was rolled back".to_owned(),
                ),
            }
        };
        let in_block = self.replies.status() != TxStatus::Idle;
        let mut err = BytesMut::new();
        encode::error_response(&mut err, Severity::Error, &code, &msg);
        let lost = self.replies.lost(&mut self.to_client, &err);
        self.apply_fates();
        if lost.told {
            // The client's open group already failed: skip the rest of it.
            self.skip_until_sync = true;
        } else if lost.open || in_block || self.pin.is_some() {
            // Between requests: report it on the client's next request.
            self.lost_transaction = Some(Box::new((code, msg)));
        }
        self.to_server.clear();
        self.query_start = None;
        self.pin = None;
        self.capture.clear();
    }
}

/// `value` with every `from` replaced by `to`, or None if it has none.
fn replace_all(value: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = value;
    let mut found = false;
    while let Some(i) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
        found = true;
    }
    out.extend_from_slice(rest);
    found.then_some(out)
}
