//! Client requests: what each message does to the session, and what goes
//! to the server for it (rewritten statement names, local answers, refusals).

use super::*;

impl Session {
    pub(super) fn on_query(&mut self, frame: Frame) -> Result<(), ClientError> {
        let Ok(text) = frontend::query(frame.body()) else {
            // As PostgreSQL: an error for this query, not a closed connection.
            self.fail_request(sqlstate::PROTOCOL_VIOLATION, "invalid string in message", true);
            return Ok(());
        };
        if self.read_only && sql::may_leave_read_only(text) {
            self.refuse_read_write(true);
            return Ok(());
        }
        if self.mode == PoolMode::Transaction {
            let fx = sql::scan(text);
            if !self.note_effects(&fx, true) {
                return Ok(());
            }
            // DEALLOCATE of a protocol-level statement: pgferry holds those,
            // so it answers itself.
            if let (Some(Some(name)), 1) = (&fx.deallocate, fx.statements) {
                if !self.rewrite {
                    return self.with_server(&frame, Request::Query);
                }
                if let Some(stmt) = self.statements.remove(name.as_bytes()) {
                    let mut b = BytesMut::new();
                    encode::command_complete(&mut b, "DEALLOCATE");
                    encode::ready_for_query(&mut b, self.replies.status());
                    let undo = || {
                        Some(Effect::Closed {
                            name: name.as_bytes().into(),
                            stmt,
                        })
                    };
                    self.respond_local(b.freeze(), true, undo);
                    return Ok(());
                }
            }
        }
        self.with_server(&frame, Request::Query)
    }

    /// Applies what a statement does to session state. Returns false if the
    /// statement was refused (the error is already queued).
    pub(super) fn note_effects(&mut self, fx: &sql::Effects, simple: bool) -> bool {
        if let Some(pin) = fx.pin {
            if self.policy == SessionStatePolicy::Error {
                let msg = format!(
                    "{} is not supported in transaction pooling mode (pgferry session_state = \"error\")",
                    pin.as_str()
                );
                self.fail_request(sqlstate::FEATURE_NOT_SUPPORTED, &msg, simple);
                return false;
            }
            if self.pin.is_none() {
                tracing::info!(
                    client = self.id,
                    reason = pin.as_str(),
                    "client pinned to its server connection"
                );
            }
            self.pin = Some(self.pin.map_or(pin, |p| p.min(pin)));
        }
        if fx.maybe_release && self.pin.is_some() {
            self.recheck_pin = true;
        }
        if fx.reset_all {
            self.reset_all = true;
            if self.pin == Some(Pin::DynamicSetting) {
                self.pin = None;
                self.recheck_pin = true;
            }
        }
        if fx.discard_all || fx.deallocate == Some(None) {
            self.statements.clear();
            self.forget_server_statements = true;
        }
        self.capture.extend(fx.settings.iter().cloned());
        true
    }

    /// A read-only user tried to leave read-only mode.
    pub(super) fn refuse_read_write(&mut self, simple: bool) {
        self.fail_request(
            sqlstate::READ_ONLY_SQL_TRANSACTION,
            "this user is read-only through pgferry: statements that could leave read-only mode are refused",
            simple,
        );
    }

    pub(super) fn on_parse(&mut self, frame: Frame) -> Result<(), ClientError> {
        let p = frontend::parse(frame.body())?;
        let held = self.interned.take();
        if self.read_only && sql::may_leave_read_only(p.query) {
            self.refuse_read_write(false);
            return Ok(());
        }
        if !self.rewrite || p.name.is_empty() {
            // Unnamed statements are parsed for each execution, so this is
            // the place to see their effects. Named ones: at each Bind.
            if self.mode == PoolMode::Transaction && !self.note_effects(&sql::scan(p.query), false) {
                return Ok(());
            }
            return self.with_server(&frame, Request::Parse);
        }
        if self.statements.contains_key(p.name) {
            let msg = format!(
                "prepared statement \"{}\" already exists",
                String::from_utf8_lossy(p.name)
            );
            self.fail_request(sqlstate::DUPLICATE_PSTATEMENT, &msg, false);
            return Ok(());
        }
        let tail = &frame.body()[p.name.len() + 1..];
        let stmt = match held {
            Some(s) if s.parse_tail[..] == *tail => s,
            _ => self.shared.statements.intern(tail),
        };
        if self.server.is_none() && stmt.is_verified() {
            // Known good: no server needed now. Waiting for one here could
            // deadlock a client library that prepares synchronously on one
            // thread while another of its connections holds a server.
            self.statements.insert(p.name.into(), stmt.clone());
            let undo = || {
                Some(Effect::Named {
                    name: p.name.into(),
                    stmt,
                })
            };
            self.respond_local(Bytes::from_static(PARSE_COMPLETE), false, undo);
            return Ok(());
        }
        if !self.require_server(false) {
            return Ok(());
        }
        self.statements.insert(p.name.into(), stmt.clone());
        self.prepare_on_server(&stmt, Some(p.name));
        Ok(())
    }

    /// Makes sure the bound server has `stmt`. For the client's own Parse
    /// of `client_name` the client gets a ParseComplete either way; for one
    /// pgferry adds before a Bind or Describe, the reply is swallowed.
    pub(super) fn prepare_on_server(&mut self, stmt: &Arc<Statement>, client_name: Option<&[u8]>) {
        let srv = self.server.as_deref_mut().expect("bound");
        if srv.statements.touch(stmt.id) {
            if let Some(name) = client_name {
                let undo = || {
                    Some(Effect::Named {
                        name: name.into(),
                        stmt: stmt.clone(),
                    })
                };
                self.respond_local(Bytes::from_static(PARSE_COMPLETE), false, undo);
            }
            return;
        }
        if let Some(victim) = srv.statements.insert(stmt.id, self.max_prepared) {
            encode::close(&mut self.to_server, b'S', format!("pgferry_{victim}").as_bytes());
            self.replies.sent(Request::Close, Reply::Swallow, None);
        }
        encode::message(&mut self.to_server, frontend::PARSE, |b| {
            b.put_slice(&stmt.name);
            b.put_u8(0);
            b.put_slice(&stmt.parse_tail);
        });
        let reply = if client_name.is_some() {
            Reply::Forward
        } else {
            Reply::Swallow
        };
        let effect = Effect::Prepared {
            stmt: stmt.clone(),
            client: client_name.map(Into::into),
        };
        self.replies.sent(Request::Parse, reply, Some(effect));
    }

    /// The client's statement `name`, or None with 26000 queued for the request.
    pub(super) fn client_statement(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        let stmt = self.statements.get(name).cloned();
        if stmt.is_none() {
            let msg = format!(
                "prepared statement \"{}\" does not exist",
                String::from_utf8_lossy(name)
            );
            self.fail_request(sqlstate::INVALID_SQL_STATEMENT_NAME, &msg, false);
        }
        stmt
    }

    /// Notes a client request written to the server, its reply forwarded.
    pub(super) fn expect_forwarded(&mut self, req: Request) {
        if self.query_start.is_none() {
            self.query_start = Some(self.now());
        }
        self.replies.sent(req, Reply::Forward, None);
    }

    pub(super) fn on_bind(&mut self, frame: Frame) -> Result<(), ClientError> {
        let b = frontend::bind(frame.body())?;
        if !self.rewrite || b.statement.is_empty() {
            return self.with_server(&frame, Request::Bind);
        }
        let Some(stmt) = self.client_statement(b.statement) else {
            return Ok(());
        };
        // Executing it is what creates session state (a lock, a LISTEN, ...).
        if !self.note_effects(&stmt.effects, false) || !self.require_server(false) {
            return Ok(());
        }
        self.prepare_on_server(&stmt, None);
        encode::bind(
            &mut self.to_server,
            b.portal,
            &stmt.name,
            &frame.body()[b.rest_offset..],
        );
        self.expect_forwarded(Request::Bind);
        Ok(())
    }

    pub(super) fn on_describe(&mut self, frame: Frame) -> Result<(), ClientError> {
        let (kind, name) = frontend::target(frame.body(), "Describe")?;
        if !self.rewrite || kind != b'S' || name.is_empty() {
            return self.with_server(&frame, Request::Describe);
        }
        let Some(stmt) = self.client_statement(name) else {
            return Ok(());
        };
        if self.require_server(false) {
            self.prepare_on_server(&stmt, None);
            encode::describe(&mut self.to_server, b'S', &stmt.name);
            self.expect_forwarded(Request::Describe);
        }
        Ok(())
    }

    pub(super) fn on_close(&mut self, frame: Frame) -> Result<(), ClientError> {
        let (kind, name) = frontend::target(frame.body(), "Close")?;
        if self.rewrite && kind == b'S' && !name.is_empty() {
            // The server copy stays cached for other clients.
            let closed = self.statements.remove(name);
            let undo = || {
                closed.map(|stmt| Effect::Closed {
                    name: name.into(),
                    stmt,
                })
            };
            self.respond_local(Bytes::from_static(CLOSE_COMPLETE), false, undo);
            return Ok(());
        }
        if self.server.is_none() && self.mode == PoolMode::Transaction && kind == b'P' {
            // No server, so no portal: closing a missing portal succeeds.
            self.respond_local(Bytes::from_static(CLOSE_COMPLETE), false, || None);
            return Ok(());
        }
        self.with_server(&frame, Request::Close)
    }

    /// Forwards `frame` to the bound server.
    pub(super) fn with_server(&mut self, frame: &Frame, req: Request) -> Result<(), ClientError> {
        if self.require_server(req == Request::Query) {
            self.forward(frame, req);
        }
        Ok(())
    }

    /// on_client_data binds a server before a handler that needs one runs;
    /// this checks it, reporting an error for the request if it is missing.
    pub(super) fn require_server(&mut self, simple: bool) -> bool {
        if self.server.is_some() {
            return true;
        }
        tracing::error!(client = self.id, "handler ran without a server connection");
        self.fail_request(
            sqlstate::INTERNAL_ERROR,
            "pgferry internal error: no server connection",
            simple,
        );
        false
    }

    pub(super) fn forward(&mut self, frame: &Frame, req: Request) {
        self.to_server.extend_from_slice(&frame.bytes);
        self.expect_forwarded(req);
    }

    /// Answers a client request itself, in order with the replies the
    /// server still owes. `sync_point`: the answer ends with ReadyForQuery.
    ///
    /// `undo` says what to take back if the server skips the request this
    /// answers. It is built only when that can still happen: in the common
    /// case (nothing in flight) the answer is final and nothing is
    /// allocated for it.
    pub(super) fn respond_local(&mut self, bytes: Bytes, sync_point: bool, undo: impl FnOnce() -> Option<Effect>) {
        let effect = if self.replies.answers_at_once() { None } else { undo() };
        self.replies.local(&mut self.to_client, bytes, sync_point, effect);
        self.apply_fates();
    }

    /// Reports an error for the current request, with PostgreSQL's
    /// consequences: a simple query gets its ReadyForQuery; an
    /// extended-protocol one skips to the next Sync; an open transaction
    /// (explicit, or the implicit one of a pipeline) is aborted. With a
    /// server bound, only the server can abort it: pgferry sends it a
    /// request that fails (a portal nobody has, or a query that raises) and
    /// puts its own error in place of the server's.
    pub(super) fn fail_request(&mut self, code: &str, message: &str, simple: bool) {
        let mut b = BytesMut::new();
        encode::error_response(&mut b, Severity::Error, code, message);
        if self.server.is_some() {
            let b = b.freeze();
            if simple {
                encode::query(&mut self.to_server, REFUSED_QUERY);
                self.replies.sent(Request::Query, Reply::ReplaceError(b), None);
            } else {
                encode::message(&mut self.to_server, frontend::EXECUTE, |m| {
                    m.put_slice(REFUSED_PORTAL);
                    m.put_u8(0);
                    m.put_i32(1);
                });
                self.replies.sent(Request::Execute, Reply::ReplaceError(b), None);
            }
            if self.query_start.is_none() {
                self.query_start = Some(self.now());
            }
            return;
        }
        if self.pending_begin.take().is_some() {
            // A deferred transaction failed before reaching a server: like
            // PostgreSQL's, it is aborted (not gone) until the client ends it.
            self.deferred_failed = true;
            if !self.replies.pending() {
                self.replies.set_status(TxStatus::Failed);
            }
        }
        if simple {
            encode::ready_for_query(&mut b, self.replies.status());
        } else {
            self.skip_until_sync = true;
        }
        self.respond_local(b.freeze(), simple, || None);
    }

    /// Keeps or undoes what requests meant, now that their fate is known.
    pub(super) fn apply_fates(&mut self) {
        for (effect, fate) in self.replies.take_fates() {
            match (effect, fate) {
                (Effect::Prepared { stmt, .. }, Fate::Done) => stmt.set_verified(),
                (Effect::Prepared { stmt, client }, _) => {
                    // The server does not have it; nor does the client, if
                    // it was the client's Parse (PostgreSQL creates no
                    // statement on a failed or skipped Parse).
                    if let Some(srv) = self.server.as_deref_mut() {
                        srv.statements.remove(stmt.id);
                    }
                    if let Some(name) = client {
                        forget_if_same(&mut self.statements, &name, &stmt);
                    }
                }
                (_, Fate::Done) => {}
                (Effect::Named { name, stmt }, _) => forget_if_same(&mut self.statements, &name, &stmt),
                (Effect::Closed { name, stmt }, _) => {
                    self.statements.entry(name).or_insert(stmt);
                }
            }
        }
    }

    pub(super) fn fail_pool(&mut self, e: &PoolError, simple: bool) {
        tracing::warn!(client = self.id, error = %e, "no server connection for client");
        self.fail_request(e.sqlstate(), &crate::error::pool_message(e), simple);
    }
}

/// Removes the client's statement `name` if it is still `stmt` (a later
/// request may have reused the name).
fn forget_if_same(statements: &mut HashMap<Box<[u8]>, Arc<Statement>>, name: &[u8], stmt: &Arc<Statement>) {
    if statements.get(name).is_some_and(|s| Arc::ptr_eq(s, stmt)) {
        statements.remove(name);
    }
}
