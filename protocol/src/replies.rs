//! Matching a server's replies to the requests sent to it (sans IO).
//!
//! A pooler may hand a server connection to another client only when
//! PostgreSQL itself says the client's work is over: a ReadyForQuery that
//! answers the last sync point (Sync, Query, FunctionCall) the client sent,
//! with nothing sent after it and the server idle ('I'). Between two
//! ReadyForQuery the server may hold an implicit transaction (extended
//! protocol messages before their Sync), or be discarding messages after an
//! error until the next Sync. [`Replies`] keeps that state from what was
//! sent and what came back, following PostgreSQL's rules (postgres.c):
//!
//! * each request gets its replies in order; an error in an extended-protocol
//!   request (Parse, Bind, Describe, Execute, Close) makes the server skip
//!   every message up to the next Sync, whether or not that Sync has been
//!   sent yet: Query and FunctionCall are skipped too;
//! * an error in a Query, a FunctionCall or a Sync (a failed commit) is
//!   followed by that request's ReadyForQuery;
//! * in COPY FROM STDIN the server consumes CopyData, ignores Flush and
//!   Sync, ends at CopyDone/CopyFail, and fails the COPY on anything else;
//!   outside COPY it ignores CopyData/CopyDone/CopyFail.
//!
//! pgferry also answers some requests itself (a Parse for a statement the
//! server already has) and sends some on its own (a Parse before the Bind
//! that needs it): [`Reply`] says what the client sees of each request's
//! replies, and `local` places pgferry's own answers in order with the
//! server's. A request the server skips is not answered, so its local
//! answer is dropped too. Each request may carry a payload `P` that comes
//! back with its [`Fate`], so that the caller can keep or undo what the
//! request meant (a statement the server now has, or does not).

use crate::backend::{self, TxStatus};
use crate::frame::Frame;
use crate::frontend;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// A message pgferry wrote to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Flush,
    Query,
    FunctionCall,
    CopyData,
    CopyDone,
    CopyFail,
}

impl Request {
    /// The request a frontend message tag is, if it is one a session sends.
    pub fn from_tag(tag: u8) -> Option<Request> {
        Some(match tag {
            frontend::PARSE => Request::Parse,
            frontend::BIND => Request::Bind,
            frontend::DESCRIBE => Request::Describe,
            frontend::EXECUTE => Request::Execute,
            frontend::CLOSE => Request::Close,
            frontend::SYNC => Request::Sync,
            frontend::FLUSH => Request::Flush,
            frontend::QUERY => Request::Query,
            frontend::FUNCTION_CALL => Request::FunctionCall,
            frontend::COPY_DATA => Request::CopyData,
            frontend::COPY_DONE => Request::CopyDone,
            frontend::COPY_FAIL => Request::CopyFail,
            _ => return None,
        })
    }

    /// Ends with ReadyForQuery, which no error skips.
    fn is_sync_point(self) -> bool {
        matches!(self, Request::Sync | Request::Query | Request::FunctionCall)
    }
}

/// What the client sees of a request's replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The client sent it: pass the replies on.
    Forward,
    /// pgferry sent it on the client's behalf: drop its replies, except an
    /// error, which is the client's (that Parse failing is the client's
    /// Bind failing).
    Swallow,
    /// pgferry sent it to make the server fail where the client's request
    /// failed in pgferry (so that the server aborts the transaction and
    /// skips to Sync exactly as it would have): the server's error is
    /// replaced with this one. Any other reply is a protocol error.
    ReplaceError(Bytes),
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It was answered (or answered locally) and succeeded.
    Done,
    /// It got an error.
    Failed,
    /// The server skipped it after an earlier error (or a COPY consumed it):
    /// as far as the client can tell, it never happened.
    Skipped,
    /// The server connection was lost before it was answered.
    Lost,
}

/// A reply the matcher cannot place: the server and pgferry disagree, so
/// the connection cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected message {:?} from the server while waiting for {}", *.tag as char, .waiting.map_or("nothing", Kind::as_str))]
pub struct MatchError {
    pub tag: u8,
    pub waiting: Option<Kind>,
}

/// What a queued slot waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server(Request),
    /// pgferry's own answer, sent when everything before it has been.
    Local {
        /// It answers a request that ends with ReadyForQuery.
        sync_point: bool,
    },
    /// The client ended a COPY (CopyDone/CopyFail) before the server said
    /// it started one: placeholder that `copy_in_started` looks for.
    CopyEnd,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Server(r) => match r {
                Request::Parse => "ParseComplete",
                Request::Bind => "BindComplete",
                Request::Describe => "a description",
                Request::Execute => "an Execute result",
                Request::Close => "CloseComplete",
                Request::Sync | Request::Query | Request::FunctionCall => "ReadyForQuery",
                _ => "nothing",
            },
            Kind::Local { .. } | Kind::CopyEnd => "nothing",
        }
    }
}

#[derive(Debug)]
struct Slot<P> {
    kind: Kind,
    reply: Reply,
    /// For `Kind::Local`: the bytes to send.
    local: Bytes,
    payload: Option<P>,
}

/// What a backend message was, for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Placed (forwarded to `out` or dropped, as its request's Reply says).
    Reply,
    /// ParameterStatus: the caller tracks it and decides whether the client
    /// needs it (nothing was written).
    ParameterStatus,
    /// ReadyForQuery with the transaction status it reports.
    Ready(TxStatus),
}

/// The replies a server connection still owes, and where the server is in
/// PostgreSQL's extended-protocol state machine.
#[derive(Debug)]
pub struct Replies<P> {
    slots: VecDeque<Slot<P>>,
    /// The server is discarding messages until a Sync that is not sent yet.
    skipping: bool,
    /// The server is (or will be, once it reaches the head request) in
    /// COPY FROM STDIN, and nothing that ends it has been sent.
    copy_in: bool,
    /// Messages were sent after the last sync point: the server may hold an
    /// implicit transaction or unnamed statement/portal state that only the
    /// next Sync's ReadyForQuery resolves.
    unsynced: bool,
    /// As of the last ReadyForQuery.
    status: TxStatus,
    fates: Vec<(P, Fate)>,
}

impl<P> Default for Replies<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> Replies<P> {
    pub fn new() -> Self {
        Replies {
            slots: VecDeque::new(),
            skipping: false,
            copy_in: false,
            unsynced: false,
            status: TxStatus::Idle,
            fates: Vec::new(),
        }
    }

    /// Transaction status as of the last ReadyForQuery.
    pub fn status(&self) -> TxStatus {
        self.status
    }

    /// pgferry itself answered a BEGIN, or the COMMIT/ROLLBACK of a
    /// transaction that never reached a server (Citus routing defers the
    /// BEGIN to the node the first statement chooses): the client's view of
    /// the transaction status. Only with nothing outstanding.
    pub fn set_status(&mut self, status: TxStatus) {
        debug_assert!(self.slots.is_empty());
        self.status = status;
    }

    /// The connection may go to another client: every request answered, the
    /// last one a sync point, the server idle and not skipping.
    pub fn releasable(&self) -> bool {
        self.slots.is_empty() && !self.unsynced && !self.skipping && !self.copy_in && self.status == TxStatus::Idle
    }

    /// Nothing is owed and no extended-protocol group is open: the server
    /// waits for the client at a ReadyForQuery boundary (in a transaction
    /// block or not).
    pub fn at_boundary(&self) -> bool {
        self.slots.is_empty() && !self.unsynced && !self.skipping && !self.copy_in
    }

    /// A local answer given now goes out at once and is final (nothing is
    /// owed before it and the server is not skipping): no need to keep
    /// anything to undo it.
    pub fn answers_at_once(&self) -> bool {
        self.slots.is_empty() && !self.skipping
    }

    /// How many requests (and local answers) wait in the queue.
    pub fn queued(&self) -> usize {
        self.slots.len()
    }

    /// Replies (or pgferry's own answers) are still owed to the client.
    pub fn pending(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Requests that could have run SQL are waiting for their replies: if
    /// the connection dies now, whether they took effect is unknown.
    pub fn executing(&self) -> bool {
        self.slots.iter().any(|s| {
            matches!(
                s.kind,
                Kind::Server(Request::Execute | Request::Query | Request::FunctionCall | Request::Sync)
            )
        })
    }

    /// The server is discarding messages until the client's next Sync.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// The server reads COPY data.
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// The head request is one pgferry sent on its own behalf.
    pub fn head_swallowed(&self) -> bool {
        matches!(
            self.slots.front(),
            Some(Slot {
                reply: Reply::Swallow,
                ..
            })
        )
    }

    /// Frees the queue's memory when nothing is queued and it holds room
    /// for more than `keep` entries (what the next transaction likely
    /// needs stays: no allocation for it).
    pub fn release_memory(&mut self, keep: usize) {
        if self.slots.is_empty() && self.slots.capacity() > keep {
            self.slots = VecDeque::new();
        }
        if self.fates.is_empty() && self.fates.capacity() > keep {
            self.fates = Vec::new();
        }
    }

    /// Fates decided since the last call, oldest first.
    pub fn take_fates(&mut self) -> std::vec::Drain<'_, (P, Fate)> {
        self.fates.drain(..)
    }

    fn fate(&mut self, payload: Option<P>, fate: Fate) {
        if let Some(p) = payload {
            self.fates.push((p, fate));
        }
    }

    /// pgferry wrote `req` to the server.
    pub fn sent(&mut self, req: Request, reply: Reply, payload: Option<P>) {
        if self.copy_in {
            match req {
                // Consumed by the COPY (CopyGetData ignores Flush and Sync).
                Request::CopyData | Request::Flush | Request::Sync => {}
                Request::CopyDone | Request::CopyFail => self.copy_in = false,
                // The COPY fails on it ("unexpected message type during
                // COPY"), consuming it: the head request gets the error.
                _ => {
                    self.copy_in = false;
                    self.fate(payload, Fate::Skipped);
                }
            }
            return;
        }
        match req {
            // No reply, no state: outside COPY the server ignores copy
            // messages, and Flush only flushes.
            Request::Flush | Request::CopyData => {}
            Request::CopyDone | Request::CopyFail => {
                if !self.skipping && !self.slots.is_empty() {
                    self.push(Kind::CopyEnd, Reply::Forward, Bytes::new(), None);
                }
            }
            Request::Sync => {
                self.skipping = false;
                self.unsynced = false;
                self.push(Kind::Server(req), reply, Bytes::new(), payload);
            }
            _ if self.skipping => self.fate(payload, Fate::Skipped),
            Request::Query | Request::FunctionCall => {
                // Like Sync, they end the implicit transaction and answer
                // with ReadyForQuery.
                self.unsynced = false;
                self.push(Kind::Server(req), reply, Bytes::new(), payload);
            }
            _ => {
                self.unsynced = true;
                self.push(Kind::Server(req), reply, Bytes::new(), payload);
            }
        }
    }

    /// pgferry answers a client request itself with `bytes`, in order with
    /// the replies still owed. `sync_point`: the request ends with
    /// ReadyForQuery (a simple query pgferry answers). Skipped, like the
    /// request would be, while the server skips to Sync.
    pub fn local(&mut self, out: &mut BytesMut, bytes: Bytes, sync_point: bool, payload: Option<P>) {
        if self.skipping {
            self.fate(payload, Fate::Skipped);
        } else if self.slots.is_empty() {
            out.extend_from_slice(&bytes);
            self.fate(payload, Fate::Done);
        } else {
            self.push(Kind::Local { sync_point }, Reply::Forward, bytes, payload);
        }
    }

    fn push(&mut self, kind: Kind, reply: Reply, local: Bytes, payload: Option<P>) {
        self.slots.push_back(Slot {
            kind,
            reply,
            local,
            payload,
        });
    }

    /// One message from the server: writes what the client gets of it to
    /// `out`. ErrorResponse with severity FATAL or PANIC must not be fed:
    /// the connection is ending (see `lost`).
    pub fn received(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<Received, MatchError> {
        let tag = frame.tag;
        match tag {
            backend::PARAMETER_STATUS => return Ok(Received::ParameterStatus),
            // A notification is the client's (LISTEN) whoever asked.
            backend::NOTIFICATION_RESPONSE => {
                out.extend_from_slice(&frame.bytes);
                return Ok(Received::Reply);
            }
            backend::NOTICE_RESPONSE => {
                if !self.head_swallowed() {
                    out.extend_from_slice(&frame.bytes);
                }
                return Ok(Received::Reply);
            }
            _ => {}
        }
        let unexpected = |s: &Self| MatchError {
            tag,
            waiting: s.slots.front().map(|s| s.kind),
        };
        let Some(Slot {
            kind: Kind::Server(req),
            reply,
            ..
        }) = self.slots.front()
        else {
            return Err(unexpected(self));
        };
        let (req, replace) = (*req, matches!(reply, Reply::ReplaceError(_)));
        if replace && tag != backend::ERROR_RESPONSE {
            return Err(unexpected(self));
        }
        use Request as R;
        // Whether the message belongs to the head request, and ends it.
        let ends = match (req, tag) {
            (_, backend::ERROR_RESPONSE) => return Ok(self.error(frame, out)),
            (R::Sync | R::Query | R::FunctionCall, backend::READY_FOR_QUERY) => {
                let status = backend::ready_for_query(frame.body()).map_err(|_| unexpected(self))?;
                self.status = status;
                self.copy_in = false;
                self.finish(frame, out, Fate::Done);
                return Ok(Received::Ready(status));
            }
            (R::Parse, backend::PARSE_COMPLETE)
            | (R::Bind, backend::BIND_COMPLETE)
            | (R::Close, backend::CLOSE_COMPLETE)
            | (R::Describe, backend::ROW_DESCRIPTION | backend::NO_DATA)
            | (R::Execute, backend::COMMAND_COMPLETE | backend::EMPTY_QUERY_RESPONSE | backend::PORTAL_SUSPENDED) => {
                true
            }
            (R::Describe, backend::PARAMETER_DESCRIPTION)
            | (R::FunctionCall, backend::FUNCTION_CALL_RESPONSE)
            | (R::Execute, backend::DATA_ROW | backend::COPY_OUT_RESPONSE | backend::COPY_DATA | backend::COPY_DONE)
            | (
                R::Query,
                backend::ROW_DESCRIPTION
                | backend::DATA_ROW
                | backend::COMMAND_COMPLETE
                | backend::EMPTY_QUERY_RESPONSE
                | backend::COPY_OUT_RESPONSE
                | backend::COPY_DATA
                | backend::COPY_DONE,
            ) => false,
            (R::Execute | R::Query, backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE) => {
                out.extend_from_slice(&frame.bytes);
                self.copy_in_started();
                return Ok(Received::Reply);
            }
            _ => return Err(unexpected(self)),
        };
        if ends {
            self.finish(frame, out, Fate::Done);
        } else if !self.head_swallowed() {
            out.extend_from_slice(&frame.bytes);
        }
        Ok(Received::Reply)
    }

    /// The head request's last reply: pass it on as its Reply says, pop it,
    /// then send the local answers now due.
    fn finish(&mut self, frame: &Frame, out: &mut BytesMut, fate: Fate) {
        let slot = self.slots.pop_front().expect("head exists");
        if slot.reply == Reply::Forward {
            out.extend_from_slice(&frame.bytes);
        }
        self.fate(slot.payload, fate);
        self.flush_local(out);
    }

    fn error(&mut self, frame: &Frame, out: &mut BytesMut) -> Received {
        self.copy_in = false;
        let head = self.slots.front_mut().expect("checked by the caller");
        match std::mem::replace(&mut head.reply, Reply::Forward) {
            Reply::ReplaceError(b) => out.extend_from_slice(&b),
            _ => out.extend_from_slice(&frame.bytes),
        }
        let Kind::Server(req) = head.kind else {
            unreachable!("the head is a server request")
        };
        if req.is_sync_point() {
            // Its ReadyForQuery follows: that request's end.
            if req == Request::Query || req == Request::FunctionCall {
                let payload = head.payload.take();
                self.fate(payload, Fate::Failed);
            }
            return Received::Reply;
        }
        let slot = self.slots.pop_front().expect("head exists");
        self.fate(slot.payload, Fate::Failed);
        // The server now discards everything up to the next Sync.
        while let Some(s) = self.slots.front() {
            if s.kind == Kind::Server(Request::Sync) {
                self.flush_local(out);
                return Received::Reply;
            }
            let s = self.slots.pop_front().expect("front exists");
            self.fate(s.payload, Fate::Skipped);
        }
        self.skipping = true;
        Received::Reply
    }

    /// Sends the local answers at the head of the queue.
    fn flush_local(&mut self, out: &mut BytesMut) {
        while let Some(Slot {
            kind: Kind::Local { .. } | Kind::CopyEnd,
            ..
        }) = self.slots.front()
        {
            let s = self.slots.pop_front().expect("front exists");
            out.extend_from_slice(&s.local);
            self.fate(s.payload, Fate::Done);
        }
    }

    /// The server started COPY FROM STDIN for the head request. What was
    /// sent after that request decides how the COPY ends: Syncs before the
    /// end are consumed (libpq sends another after CopyDone), a CopyDone or
    /// CopyFail ends it, and any other request fails it and is consumed.
    fn copy_in_started(&mut self) {
        let mut i = 1;
        while i < self.slots.len() {
            match self.slots[i].kind {
                Kind::CopyEnd => {
                    self.slots.remove(i);
                    return;
                }
                Kind::Server(Request::Sync) => {
                    let s = self.slots.remove(i).expect("index checked");
                    self.fate(s.payload, Fate::Skipped);
                }
                Kind::Server(_) => {
                    let s = self.slots.remove(i).expect("index checked");
                    self.fate(s.payload, Fate::Skipped);
                    return;
                }
                Kind::Local { .. } => i += 1,
            }
        }
        self.copy_in = true;
    }

    /// The server connection is gone. Every request still owed a reply
    /// fails as PostgreSQL would have failed it: the first unanswered
    /// request of each group up to a Sync gets `error` (an encoded
    /// ErrorResponse) and the rest of the group is skipped; every sync point
    /// gets ReadyForQuery (idle: the server's transaction is gone).
    pub fn lost(&mut self, out: &mut BytesMut, error: &[u8]) -> Lost {
        let mut failed = self.skipping;
        let open = self.unsynced || self.skipping;
        let slots = std::mem::take(&mut self.slots);
        for s in slots {
            match s.kind {
                Kind::Local { sync_point: false } if !failed => {
                    out.extend_from_slice(&s.local);
                    self.fate(s.payload, Fate::Done);
                }
                Kind::Local { sync_point: false } | Kind::CopyEnd => self.fate(s.payload, Fate::Lost),
                Kind::Server(Request::Sync) => {
                    if !failed {
                        out.extend_from_slice(error);
                    }
                    crate::encode::ready_for_query(out, TxStatus::Idle);
                    failed = false;
                    self.fate(s.payload, Fate::Lost);
                }
                Kind::Local { sync_point: true } | Kind::Server(Request::Query | Request::FunctionCall) => {
                    out.extend_from_slice(error);
                    crate::encode::ready_for_query(out, TxStatus::Idle);
                    failed = false;
                    self.fate(s.payload, Fate::Lost);
                }
                Kind::Server(_) => {
                    if !failed {
                        out.extend_from_slice(error);
                        failed = true;
                    }
                    self.fate(s.payload, Fate::Lost);
                }
            }
        }
        self.skipping = false;
        self.copy_in = false;
        self.unsynced = false;
        self.status = TxStatus::Idle;
        Lost {
            open,
            told: open && failed,
        }
    }
}

/// The client's last request group when its server connection was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    /// Not ended by a sync point yet: the client will send more of it, then
    /// Sync.
    pub open: bool,
    /// The client already got the error for it: skip its messages up to
    /// Sync. Open and not told: the next message gets the error.
    pub told: bool,
}

#[cfg(test)]
#[path = "replies_tests.rs"]
mod tests;
