//! Tests of the reply matcher: byte vectors for each rule, then a property
//! test against a model of PostgreSQL's extended-protocol semantics.

use super::*;
use crate::decode_frame;
use crate::encode;
use bytes::BufMut;
use proptest::prelude::*;

type R = Replies<u32>;

fn frame(tag: u8, body: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    encode::message(&mut b, tag, |b| b.put_slice(body));
    Frame { tag, bytes: b.freeze() }
}

fn err(code: &str) -> Frame {
    let mut b = BytesMut::new();
    encode::error_response(&mut b, encode::Severity::Error, code, "boom");
    let bytes = b.freeze();
    Frame { tag: b'E', bytes }
}

fn z(status: u8) -> Frame {
    frame(b'Z', &[status])
}

/// Feeds frames, returns the tags written to the client.
fn feed(r: &mut R, frames: &[Frame]) -> String {
    let mut out = BytesMut::new();
    for f in frames {
        r.received(f, &mut out).unwrap();
    }
    tags(&out)
}

fn tags(mut out: &[u8]) -> String {
    let mut s = String::new();
    while out.len() >= 5 {
        let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        s.push(out[0] as char);
        out = &out[len + 1..];
    }
    assert!(out.is_empty(), "whole messages only");
    s
}

fn send(r: &mut R, reqs: &[Request]) {
    for &q in reqs {
        r.sent(q, Reply::Forward, None);
    }
}

fn fates(r: &mut R) -> Vec<(u32, Fate)> {
    r.take_fates().collect()
}

use Request::*;

#[test]
fn simple_query_is_released_at_idle_ready_for_query() {
    let mut r = R::new();
    assert!(r.releasable());
    send(&mut r, &[Query]);
    assert!(!r.releasable());
    assert_eq!(
        feed(&mut r, &[frame(b'T', b""), frame(b'D', b""), frame(b'C', b"")]),
        "TDC"
    );
    assert!(!r.releasable());
    assert_eq!(feed(&mut r, &[z(b'I')]), "Z");
    assert!(r.releasable());
}

#[test]
fn a_transaction_block_keeps_the_connection_until_it_ends() {
    let mut r = R::new();
    send(&mut r, &[Query]);
    feed(&mut r, &[frame(b'C', b"BEGIN\0"), z(b'T')]);
    assert_eq!(r.status(), TxStatus::InTransaction);
    assert!(!r.releasable());
    assert!(r.at_boundary());
    send(&mut r, &[Query]);
    feed(&mut r, &[err("22012"), z(b'E')]);
    assert!(!r.releasable());
    send(&mut r, &[Query]);
    feed(&mut r, &[frame(b'C', b"ROLLBACK\0"), z(b'I')]);
    assert!(r.releasable());
}

/// The bug of issue 12: replies to a Flush arrive, the queue is empty, the
/// last ReadyForQuery said idle, but the client's group is still open.
#[test]
fn flush_before_sync_keeps_the_connection() {
    let mut r = R::new();
    send(&mut r, &[Parse, Bind, Execute, Parse, Bind, Execute, Flush]);
    let out = feed(
        &mut r,
        &[
            frame(b'1', b""),
            frame(b'2', b""),
            frame(b'C', b"BEGIN\0"),
            frame(b'1', b""),
            frame(b'2', b""),
            frame(b'C', b"INSERT 0 1\0"),
        ],
    );
    assert_eq!(out, "12C12C");
    assert!(!r.pending());
    assert!(!r.releasable(), "no ReadyForQuery answered the group yet");
    assert!(!r.at_boundary());
    send(&mut r, &[Sync]);
    assert_eq!(feed(&mut r, &[z(b'T')]), "Z");
    assert!(!r.releasable(), "in a transaction block");
    send(&mut r, &[Parse, Bind, Execute, Sync]);
    feed(
        &mut r,
        &[frame(b'1', b""), frame(b'2', b""), frame(b'C', b"COMMIT\0"), z(b'I')],
    );
    assert!(r.releasable());
}

/// The other bug of issue 12: the error arrives before the client's Sync;
/// what the client sends next is skipped by the server, and the connection
/// stays until the Sync's ReadyForQuery.
#[test]
fn error_before_sync_is_sent_skips_what_follows() {
    let mut r = R::new();
    r.sent(Parse, Reply::Forward, Some(1));
    r.sent(Bind, Reply::Forward, Some(2));
    r.sent(Execute, Reply::Forward, Some(3));
    assert_eq!(feed(&mut r, &[frame(b'1', b""), frame(b'2', b""), err("22012")]), "12E");
    assert!(r.skipping());
    assert!(!r.releasable());
    assert_eq!(fates(&mut r), [(1, Fate::Done), (2, Fate::Done), (3, Fate::Failed)]);
    // The INSERT the client pipelines next never runs: nothing is queued.
    r.sent(Parse, Reply::Forward, Some(4));
    r.sent(Bind, Reply::Forward, Some(5));
    r.sent(Execute, Reply::Forward, Some(6));
    r.sent(Query, Reply::Forward, Some(7));
    assert!(!r.pending());
    assert_eq!(
        fates(&mut r),
        [
            (4, Fate::Skipped),
            (5, Fate::Skipped),
            (6, Fate::Skipped),
            (7, Fate::Skipped)
        ]
    );
    assert!(!r.releasable());
    r.sent(Sync, Reply::Forward, Some(8));
    assert!(!r.skipping());
    assert_eq!(feed(&mut r, &[z(b'I')]), "Z");
    assert!(r.releasable());
    assert_eq!(fates(&mut r), [(8, Fate::Done)]);
}

#[test]
fn error_with_sync_queued_skips_up_to_it() {
    let mut r = R::new();
    for (i, q) in [Parse, Bind, Execute, Parse, Bind, Execute, Sync, Query]
        .into_iter()
        .enumerate()
    {
        r.sent(q, Reply::Forward, Some(i as u32));
    }
    let out = feed(&mut r, &[frame(b'1', b""), frame(b'2', b""), err("23505")]);
    assert_eq!(out, "12E");
    assert!(!r.skipping(), "the Sync is already on its way");
    assert_eq!(
        fates(&mut r),
        [
            (0, Fate::Done),
            (1, Fate::Done),
            (2, Fate::Failed),
            (3, Fate::Skipped),
            (4, Fate::Skipped),
            (5, Fate::Skipped)
        ]
    );
    assert_eq!(feed(&mut r, &[z(b'I'), frame(b'C', b""), z(b'I')]), "ZCZ");
    assert!(r.releasable());
}

#[test]
fn errors_in_one_group_do_not_reach_the_next() {
    let mut r = R::new();
    send(&mut r, &[Parse, Bind, Execute, Sync, Parse, Bind, Execute, Sync]);
    let out = feed(
        &mut r,
        &[
            frame(b'1', b""),
            err("22012"),
            z(b'I'),
            frame(b'1', b""),
            frame(b'2', b""),
            frame(b'D', b""),
            frame(b'C', b""),
            z(b'I'),
        ],
    );
    assert_eq!(out, "1EZ12DCZ");
    assert!(r.releasable());
}

#[test]
fn error_in_a_query_or_function_call_is_followed_by_its_ready_for_query() {
    let mut r = R::new();
    r.sent(Query, Reply::Forward, Some(1));
    r.sent(FunctionCall, Reply::Forward, Some(2));
    assert_eq!(feed(&mut r, &[frame(b'C', b""), err("22012")]), "CE");
    assert!(!r.skipping(), "a simple query's error does not skip to Sync");
    assert_eq!(feed(&mut r, &[z(b'I'), err("42883"), z(b'I')]), "ZEZ");
    assert_eq!(fates(&mut r), [(1, Fate::Failed), (2, Fate::Failed)]);
    assert!(r.releasable());
}

#[test]
fn a_failed_commit_at_sync_is_followed_by_ready_for_query() {
    let mut r = R::new();
    send(&mut r, &[Parse, Bind, Execute, Sync]);
    let out = feed(
        &mut r,
        &[
            frame(b'1', b""),
            frame(b'2', b""),
            frame(b'C', b""),
            err("23503"),
            z(b'I'),
        ],
    );
    assert_eq!(out, "12CEZ");
    assert!(r.releasable());
}

#[test]
fn local_answers_go_out_in_order() {
    let mut r = R::new();
    let mut out = BytesMut::new();
    r.local(&mut out, Bytes::from_static(b"1\0\0\0\x04"), false, Some(1));
    assert_eq!(tags(&out), "1", "nothing pending: at once");
    assert_eq!(fates(&mut r), [(1, Fate::Done)]);
    out.clear();
    r.sent(Bind, Reply::Forward, None);
    r.local(&mut out, Bytes::from_static(b"3\0\0\0\x04"), false, Some(2));
    r.sent(Execute, Reply::Forward, None);
    r.local(&mut out, Bytes::from_static(b"1\0\0\0\x04"), false, Some(3));
    assert!(out.is_empty(), "after the Bind's reply");
    r.received(&frame(b'2', b""), &mut out).unwrap();
    assert_eq!(tags(&out), "23");
    r.received(&frame(b'C', b""), &mut out).unwrap();
    assert_eq!(tags(&out), "23C1");
    assert_eq!(fates(&mut r), [(2, Fate::Done), (3, Fate::Done)]);
}

#[test]
fn local_answers_are_skipped_like_the_requests_they_answer() {
    let mut r = R::new();
    let mut out = BytesMut::new();
    r.sent(Bind, Reply::Forward, None);
    r.local(&mut out, Bytes::from_static(b"1\0\0\0\x04"), false, Some(1));
    r.sent(Sync, Reply::Forward, None);
    r.local(&mut out, Bytes::from_static(b"3\0\0\0\x04"), false, Some(2));
    r.received(&err("26000"), &mut out).unwrap();
    assert_eq!(tags(&out), "E", "the ParseComplete after the failed Bind is skipped");
    r.received(&z(b'I'), &mut out).unwrap();
    assert_eq!(tags(&out), "EZ3");
    assert_eq!(fates(&mut r), [(1, Fate::Skipped), (2, Fate::Done)]);
    // While the server skips (no Sync sent yet), a local answer is dropped.
    out.clear();
    r.sent(Execute, Reply::Forward, None);
    r.received(&err("34000"), &mut out).unwrap();
    r.local(&mut out, Bytes::from_static(b"1\0\0\0\x04"), false, Some(3));
    r.local(&mut out, Bytes::from_static(b"C\0\0\0\x04Z\0\0\0\x05I"), true, Some(4));
    assert_eq!(tags(&out), "E");
    assert_eq!(fates(&mut r), [(3, Fate::Skipped), (4, Fate::Skipped)]);
}

#[test]
fn swallowed_replies_are_dropped_but_their_errors_reach_the_client() {
    let mut r = R::new();
    r.sent(Parse, Reply::Swallow, Some(1));
    r.sent(Bind, Reply::Forward, Some(2));
    r.sent(Execute, Reply::Forward, None);
    r.sent(Sync, Reply::Forward, None);
    assert_eq!(
        feed(&mut r, &[frame(b'1', b""), frame(b'2', b""), frame(b'C', b""), z(b'I')]),
        "2CZ"
    );
    r.sent(Parse, Reply::Swallow, Some(3));
    r.sent(Bind, Reply::Forward, Some(4));
    r.sent(Sync, Reply::Forward, None);
    let mut out = BytesMut::new();
    r.received(&frame(b'N', b""), &mut out).unwrap();
    assert!(out.is_empty(), "a notice from pgferry's own Parse");
    r.received(&frame(b'A', b""), &mut out).unwrap();
    assert_eq!(tags(&out), "A", "a notification is always the client's");
    assert_eq!(feed(&mut r, &[err("42P01"), z(b'I')]), "EZ");
    assert_eq!(
        fates(&mut r),
        [(1, Fate::Done), (2, Fate::Done), (3, Fate::Failed), (4, Fate::Skipped)]
    );
}

#[test]
fn replace_error_puts_pgferrys_error_where_the_server_failed() {
    let mut r = R::new();
    let mine = {
        let mut b = BytesMut::new();
        encode::error_response(
            &mut b,
            encode::Severity::Error,
            "26000",
            "prepared statement \"s1\" does not exist",
        );
        b.freeze()
    };
    send(&mut r, &[Query]);
    feed(&mut r, &[frame(b'C', b""), z(b'T')]);
    r.sent(Execute, Reply::ReplaceError(mine.clone()), Some(1));
    r.sent(Execute, Reply::Forward, Some(2));
    let mut out = BytesMut::new();
    r.received(&err("34000"), &mut out).unwrap();
    assert_eq!(&out[..], &mine[..], "the server's error is replaced");
    assert!(r.skipping());
    r.sent(Sync, Reply::Forward, None);
    assert_eq!(feed(&mut r, &[z(b'E')]), "Z");
    assert_eq!(fates(&mut r), [(1, Fate::Failed), (2, Fate::Skipped)]);
    // Anything but an error for it means the two sides disagree.
    r.sent(Execute, Reply::ReplaceError(mine), None);
    let e = r.received(&frame(b'C', b""), &mut out).unwrap_err();
    assert_eq!(e.tag, b'C');
}

#[test]
fn parameter_status_is_left_to_the_caller() {
    let mut r = R::new();
    let mut out = BytesMut::new();
    assert_eq!(
        r.received(&frame(b'S', b"a\0b\0"), &mut out).unwrap(),
        Received::ParameterStatus
    );
    assert!(out.is_empty());
}

#[test]
fn replies_nobody_asked_for_are_errors() {
    let mut out = BytesMut::new();
    for f in [
        z(b'I'),
        frame(b'1', b""),
        frame(b'C', b""),
        err("XX000"),
        frame(b'R', b""),
    ] {
        let mut r = R::new();
        assert!(r.received(&f, &mut out).is_err(), "{:?}", f.tag as char);
    }
    let mut r = R::new();
    send(&mut r, &[Bind]);
    let e = r.received(&frame(b'1', b""), &mut out).unwrap_err();
    assert_eq!(e.waiting, Some(Kind::Server(Bind)));
    assert!(e.to_string().contains("BindComplete"));
    let mut r = R::new();
    send(&mut r, &[Execute]);
    assert!(r.received(&z(b'I'), &mut out).is_err(), "ReadyForQuery for an Execute");
    let mut r = R::new();
    send(&mut r, &[Sync]);
    assert!(r.received(&z(b'X'), &mut out).is_err(), "bad status byte");
    assert!(out.is_empty());
}

#[test]
fn describe_execute_and_empty_queries() {
    let mut r = R::new();
    send(
        &mut r,
        &[Parse, Describe, Bind, Describe, Execute, Execute, Sync, Query],
    );
    let out = feed(
        &mut r,
        &[
            frame(b'1', b""),
            frame(b't', b""),
            frame(b'T', b""),
            frame(b'2', b""),
            frame(b'n', b""),
            frame(b'D', b""),
            frame(b's', b""),
            frame(b'I', b""),
            z(b'I'),
            frame(b'I', b""),
            z(b'I'),
        ],
    );
    assert_eq!(out, "1tT2nDsIZIZ");
    assert!(r.releasable());
}

#[test]
fn copy_from_stdin_by_simple_query() {
    let mut r = R::new();
    send(&mut r, &[Query]);
    assert_eq!(feed(&mut r, &[frame(b'G', b"")]), "G");
    assert!(r.copy_in());
    send(&mut r, &[CopyData, CopyData, Flush, CopyDone]);
    assert!(!r.copy_in());
    assert_eq!(feed(&mut r, &[frame(b'C', b"COPY 2\0"), z(b'I')]), "CZ");
    assert!(r.releasable());
}

#[test]
fn copy_from_stdin_extended_with_the_sync_sent_early() {
    // libpq: Bind/Execute/Sync, then the data, CopyDone and another Sync.
    let mut r = R::new();
    send(&mut r, &[Parse, Bind, Execute, Sync]);
    assert_eq!(
        feed(&mut r, &[frame(b'1', b""), frame(b'2', b""), frame(b'G', b"")]),
        "12G"
    );
    assert!(r.copy_in(), "the first Sync is consumed by the COPY");
    send(&mut r, &[CopyData, Sync, CopyDone, Sync]);
    assert_eq!(feed(&mut r, &[frame(b'C', b""), z(b'I')]), "CZ");
    assert!(r.releasable());
}

#[test]
fn copy_ended_before_the_server_said_it_began() {
    let mut r = R::new();
    send(&mut r, &[Query, CopyData, CopyDone, Query]);
    assert_eq!(feed(&mut r, &[frame(b'G', b"")]), "G");
    assert!(!r.copy_in(), "the CopyDone is already on its way");
    assert_eq!(
        feed(&mut r, &[frame(b'C', b""), z(b'I'), frame(b'C', b""), z(b'I')]),
        "CZCZ"
    );
    assert!(r.releasable());
}

#[test]
fn copy_failing_midway_in_the_extended_protocol_skips_to_sync() {
    let mut r = R::new();
    send(&mut r, &[Bind, Execute, Sync]);
    feed(&mut r, &[frame(b'2', b""), frame(b'G', b"")]);
    send(&mut r, &[CopyData]);
    assert_eq!(feed(&mut r, &[err("22P02")]), "E");
    assert!(!r.copy_in());
    assert!(r.skipping());
    send(&mut r, &[CopyData, CopyDone]);
    assert!(!r.pending(), "ignored outside COPY");
    send(&mut r, &[Sync]);
    assert_eq!(feed(&mut r, &[z(b'I')]), "Z");
    assert!(r.releasable());
}

#[test]
fn copy_failing_in_a_simple_query_then_the_client_ends_it() {
    let mut r = R::new();
    send(&mut r, &[Query]);
    feed(&mut r, &[frame(b'G', b"")]);
    assert_eq!(feed(&mut r, &[err("22P02"), z(b'I')]), "EZ");
    send(&mut r, &[CopyData, CopyFail]);
    assert!(!r.pending());
    assert!(r.releasable());
}

#[test]
fn copy_failed_by_another_message_consumes_it() {
    let mut r = R::new();
    send(&mut r, &[Query]);
    feed(&mut r, &[frame(b'G', b"")]);
    r.sent(Parse, Reply::Forward, Some(1));
    assert_eq!(fates(&mut r), [(1, Fate::Skipped)]);
    assert_eq!(feed(&mut r, &[err("08P01"), z(b'I')]), "EZ");
    assert!(r.releasable());
    // Pipelined before the CopyInResponse came back.
    send(&mut r, &[Query, Sync]);
    r.sent(Close, Reply::Forward, Some(2));
    send(&mut r, &[Sync]);
    feed(&mut r, &[frame(b'G', b"")]);
    assert_eq!(fates(&mut r), [(2, Fate::Skipped)]);
    assert_eq!(feed(&mut r, &[err("08P01"), z(b'I'), z(b'I')]), "EZZ");
    assert!(r.releasable());
}

#[test]
fn copy_to_stdout() {
    let mut r = R::new();
    send(&mut r, &[Query, Bind, Execute, Sync]);
    let out = feed(
        &mut r,
        &[
            frame(b'H', b""),
            frame(b'd', b""),
            frame(b'c', b""),
            frame(b'C', b""),
            z(b'I'),
            frame(b'2', b""),
            frame(b'H', b""),
            frame(b'd', b""),
            frame(b'c', b""),
            frame(b'C', b""),
            z(b'I'),
        ],
    );
    assert_eq!(out, "HdcCZ2HdcCZ");
    assert!(r.releasable());
}

#[test]
fn function_call() {
    let mut r = R::new();
    send(&mut r, &[FunctionCall]);
    assert_eq!(feed(&mut r, &[frame(b'V', b""), z(b'I')]), "VZ");
    assert!(r.releasable());
}

#[test]
fn lost_fails_each_group_once_and_answers_each_sync_point() {
    let mut r = R::new();
    send(&mut r, &[Parse, Bind, Execute, Sync, Query, Parse, Bind]);
    feed(&mut r, &[frame(b'1', b"")]);
    assert!(r.executing());
    let mut out = BytesMut::new();
    let lost = r.lost(&mut out, &err("08006").bytes);
    // Bind fails, Execute skipped, Sync answered; the Query fails; the open
    // group fails at its Parse.
    assert_eq!(tags(&out), "EZEZE");
    assert_eq!(lost, Lost { open: true, told: true });
    assert!(r.releasable());
}

#[test]
fn lost_between_requests() {
    // Everything answered after a Flush: the group is open, the client was
    // not told.
    let mut r = R::new();
    send(&mut r, &[Parse, Bind, Execute, Flush]);
    feed(&mut r, &[frame(b'1', b""), frame(b'2', b""), frame(b'C', b"")]);
    assert!(!r.executing());
    let mut out = BytesMut::new();
    assert_eq!(
        r.lost(&mut out, &err("08006").bytes),
        Lost {
            open: true,
            told: false
        }
    );
    assert!(out.is_empty());
    // In a transaction block with nothing in flight.
    let mut r = R::new();
    send(&mut r, &[Query]);
    feed(&mut r, &[frame(b'C', b""), z(b'T')]);
    assert_eq!(
        r.lost(&mut out, &err("08006").bytes),
        Lost {
            open: false,
            told: false
        }
    );
    assert!(out.is_empty());
    // While skipping: the client had its error.
    let mut r = R::new();
    send(&mut r, &[Execute]);
    feed(&mut r, &[err("34000")]);
    assert_eq!(r.lost(&mut out, &err("08006").bytes), Lost { open: true, told: true });
    assert!(out.is_empty());
}

#[test]
fn lost_keeps_local_answers_before_the_failure() {
    let mut r = R::new();
    let mut out = BytesMut::new();
    send(&mut r, &[Query]);
    r.local(&mut out, Bytes::from_static(b"1\0\0\0\x04"), false, Some(1));
    send(&mut r, &[Bind]);
    r.local(&mut out, Bytes::from_static(b"3\0\0\0\x04"), false, Some(2));
    send(&mut r, &[Sync]);
    r.lost(&mut out, &err("08006").bytes);
    assert_eq!(tags(&out), "EZ1EZ");
    assert_eq!(fates(&mut r), [(1, Fate::Done), (2, Fate::Lost)]);
}

// ---- property test against a model of PostgreSQL ----

/// A client request, as the client sent it, and how pgferry handled it.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Forwarded; `fail`: the server rejects it.
    Parse {
        fail: bool,
    },
    Bind {
        fail: bool,
    },
    Describe {
        fail: bool,
    },
    Execute {
        rows: u8,
        fail: bool,
    },
    Close,
    Sync {
        commit_fails: bool,
    },
    Flush,
    Query(Q),
    /// pgferry answers a Parse itself (the statement is known good).
    LocalParse,
    /// pgferry adds a Parse of its own before the client's Bind.
    AddedParse {
        fail: bool,
    },
    /// pgferry refuses the client's request: poison + ReplaceError.
    Refused,
}

#[derive(Debug, Clone, Copy)]
enum Q {
    Select,
    Fail,
    Begin,
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    // Most requests succeed, as in real pipelines.
    let fail = || prop::bool::weighted(0.12);
    prop_oneof![
        4 => fail().prop_map(|fail| Op::Parse { fail }),
        4 => fail().prop_map(|fail| Op::Bind { fail }),
        2 => fail().prop_map(|fail| Op::Describe { fail }),
        5 => (0u8..3, fail()).prop_map(|(rows, fail)| Op::Execute { rows, fail }),
        1 => Just(Op::Close),
        5 => fail().prop_map(|commit_fails| Op::Sync { commit_fails }),
        2 => Just(Op::Flush),
        1 => Just(Op::Query(Q::Select)),
        1 => Just(Op::Query(Q::Fail)),
        1 => Just(Op::Query(Q::Begin)),
        1 => Just(Op::Query(Q::Commit)),
        2 => Just(Op::LocalParse),
        2 => fail().prop_map(|fail| Op::AddedParse { fail }),
        1 => Just(Op::Refused),
    ]
}

/// PostgreSQL, as far as message flow goes (postgres.c).
#[derive(Default)]
struct Pg {
    skipping: bool,
    block: bool,
    failed: bool,
    /// Server messages after the last sync point.
    unsynced: bool,
}

/// What one op produces: the server's replies (to the connection) and what
/// the client must see, and the op's fate.
struct Outcome {
    server: Vec<Frame>,
    client: Vec<Frame>,
    fate: Option<Fate>,
}

const MINE: &[u8] = b"E\0\0\0\x0bSMINE\0\0";

impl Pg {
    fn status(&self) -> u8 {
        match (self.block, self.failed) {
            (false, _) => b'I',
            (true, false) => b'T',
            (true, true) => b'E',
        }
    }

    fn fail(&mut self, extended: bool) -> Frame {
        if self.block {
            self.failed = true;
        }
        if extended {
            self.skipping = true;
        }
        err("XX000")
    }

    fn run(&mut self, op: Op) -> Outcome {
        let local = matches!(op, Op::LocalParse);
        if !local && !matches!(op, Op::Flush | Op::Sync { .. } | Op::Query(_)) {
            self.unsynced = true;
        }
        if self.skipping && !matches!(op, Op::Sync { .. }) {
            let fate = (!matches!(op, Op::Flush)).then_some(Fate::Skipped);
            return Outcome {
                server: vec![],
                client: vec![],
                fate,
            };
        }
        let ok = |f: Frame| Outcome {
            server: vec![f.clone()],
            client: vec![f],
            fate: Some(Fate::Done),
        };
        let failed = |pg: &mut Pg, before: Vec<Frame>, extended: bool| {
            let e = pg.fail(extended);
            let mut server = before.clone();
            server.push(e.clone());
            let mut client = before;
            client.push(e);
            Outcome {
                server,
                client,
                fate: Some(Fate::Failed),
            }
        };
        match op {
            Op::Parse { fail: true } | Op::Bind { fail: true } | Op::Describe { fail: true } => {
                failed(self, vec![], true)
            }
            Op::Parse { .. } => ok(frame(b'1', b"")),
            Op::Bind { .. } => ok(frame(b'2', b"")),
            Op::Describe { .. } => {
                let v = vec![frame(b't', b""), frame(b'T', b"")];
                Outcome {
                    server: v.clone(),
                    client: v,
                    fate: Some(Fate::Done),
                }
            }
            Op::Execute { rows, fail } => {
                let mut v: Vec<Frame> = (0..rows).map(|_| frame(b'D', b"")).collect();
                if fail {
                    return failed(self, v, true);
                }
                v.push(frame(b'C', b""));
                Outcome {
                    server: v.clone(),
                    client: v,
                    fate: Some(Fate::Done),
                }
            }
            Op::Close => ok(frame(b'3', b"")),
            Op::Flush => Outcome {
                server: vec![],
                client: vec![],
                fate: None,
            },
            Op::Sync { commit_fails } => {
                self.skipping = false;
                self.unsynced = false;
                let mut v = vec![];
                // An implicit transaction's commit can fail (deferred
                // constraints); a block's Sync commits nothing.
                if commit_fails && !self.block {
                    v.push(err("23503"));
                }
                v.push(z(self.status()));
                Outcome {
                    server: v.clone(),
                    client: v,
                    fate: Some(Fate::Done),
                }
            }
            Op::Query(q) => {
                self.unsynced = false;
                let (mut v, fate) = match q {
                    Q::Select => (vec![frame(b'T', b""), frame(b'D', b""), frame(b'C', b"")], Fate::Done),
                    Q::Fail => (vec![self.fail(false)], Fate::Failed),
                    Q::Begin => {
                        self.block = true;
                        (vec![frame(b'C', b"")], Fate::Done)
                    }
                    Q::Commit => {
                        self.block = false;
                        self.failed = false;
                        (vec![frame(b'C', b"")], Fate::Done)
                    }
                };
                v.push(z(self.status()));
                Outcome {
                    server: v.clone(),
                    client: v,
                    fate: Some(fate),
                }
            }
            Op::LocalParse => Outcome {
                server: vec![],
                client: vec![frame(b'1', b"")],
                fate: Some(Fate::Done),
            },
            Op::AddedParse { fail } => {
                if fail {
                    failed(self, vec![], true)
                } else {
                    Outcome {
                        server: vec![frame(b'1', b"")],
                        client: vec![],
                        fate: Some(Fate::Done),
                    }
                }
            }
            Op::Refused => {
                let e = self.fail(true);
                Outcome {
                    server: vec![e],
                    client: vec![Frame {
                        tag: b'E',
                        bytes: Bytes::from_static(MINE),
                    }],
                    fate: Some(Fate::Failed),
                }
            }
        }
    }
}

/// Drives the matcher with `ops`, interleaving sends with the delivery of
/// server bytes in chunks (`steps`: true = send the next op, else deliver
/// up to `chunk` bytes), checking the client stream, the fates, and that
/// the connection is never releasable while the model says the server is
/// not at an idle boundary.
fn check(ops: &[Op], steps: &[(bool, usize)]) -> Result<(), TestCaseError> {
    let mut pg = Pg::default();
    let mut r = R::new();
    let mut expected = BytesMut::new();
    let mut expected_fates = Vec::new();
    let mut wire = BytesMut::new(); // server bytes not yet delivered
    let mut rbuf = BytesMut::new(); // delivered, not yet a whole frame
    let mut out = BytesMut::new();
    let mut got_fates = Vec::new();
    let mut next = 0;
    let mut step = steps.iter().cycle();
    loop {
        let (send_now, chunk) = *step.next().expect("cycle");
        if next < ops.len() && (send_now || wire.is_empty() && rbuf.is_empty()) {
            let op = ops[next];
            let id = next as u32;
            next += 1;
            let o = pg.run(op);
            for f in &o.server {
                wire.extend_from_slice(&f.bytes);
            }
            for f in &o.client {
                expected.extend_from_slice(&f.bytes);
            }
            if let Some(f) = o.fate {
                expected_fates.push((id, f));
            }
            let p = o.fate.map(|_| id);
            match op {
                Op::Parse { .. } => r.sent(Parse, Reply::Forward, p),
                Op::Bind { .. } => r.sent(Bind, Reply::Forward, p),
                Op::Describe { .. } => r.sent(Describe, Reply::Forward, p),
                Op::Execute { .. } => r.sent(Execute, Reply::Forward, p),
                Op::Close => r.sent(Close, Reply::Forward, p),
                Op::Sync { .. } => r.sent(Sync, Reply::Forward, p),
                Op::Flush => r.sent(Flush, Reply::Forward, p),
                Op::Query(_) => r.sent(Query, Reply::Forward, p),
                Op::LocalParse => r.local(&mut out, Bytes::from_static(b"1\0\0\0\x04"), false, p),
                Op::AddedParse { .. } => r.sent(Parse, Reply::Swallow, p),
                Op::Refused => r.sent(Execute, Reply::ReplaceError(Bytes::from_static(MINE)), p),
            }
        } else if !wire.is_empty() {
            let n = chunk.clamp(1, wire.len());
            rbuf.extend_from_slice(&wire.split_to(n));
            while let Some(f) = decode_frame(&mut rbuf, 1 << 20).unwrap() {
                r.received(&f, &mut out)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
        } else if next >= ops.len() {
            break;
        }
        got_fates.extend(r.take_fates());
        // The one promise: releasable only at an idle ReadyForQuery with
        // nothing sent after it (and so, nothing owed).
        if r.releasable() {
            prop_assert!(wire.is_empty() && rbuf.is_empty(), "released with replies owed");
            prop_assert!(!pg.skipping && !pg.unsynced && pg.status() == b'I');
        }
    }
    prop_assert_eq!(tags(&out), tags(&expected));
    prop_assert_eq!(&out[..], &expected[..]);
    got_fates.sort_by_key(|f| f.0);
    prop_assert_eq!(got_fates, expected_fates);
    // And it is released once the model is at an idle boundary.
    prop_assert_eq!(
        r.releasable(),
        !pg.skipping && !pg.unsynced && pg.status() == b'I',
        "end state"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn matches_postgresql(
        ops in proptest::collection::vec(op(), 0..40),
        steps in proptest::collection::vec((any::<bool>(), 1usize..40), 1..20),
    ) {
        check(&ops, &steps)?;
    }
}

/// A regression corpus of shapes real drivers send.
#[test]
fn driver_shapes() {
    use Op::*;
    let psycopg_pipeline = [
        Parse { fail: false },
        Bind { fail: false },
        Describe { fail: false },
        Execute { rows: 1, fail: false },
        Parse { fail: false },
        Bind { fail: false },
        Describe { fail: false },
        Execute { rows: 0, fail: true },
        Parse { fail: false },
        Bind { fail: false },
        Execute { rows: 1, fail: false },
        Sync { commit_fails: false },
        Parse { fail: false },
        Bind { fail: false },
        Execute { rows: 1, fail: false },
        Sync { commit_fails: false },
    ];
    let jdbc_batch = [
        Query(Q::Begin),
        AddedParse { fail: false },
        Bind { fail: false },
        Execute { rows: 0, fail: false },
        Bind { fail: true },
        Execute { rows: 0, fail: false },
        Flush,
        Bind { fail: false },
        Execute { rows: 0, fail: false },
        Sync { commit_fails: false },
        Query(Q::Commit),
    ];
    for ops in [&psycopg_pipeline[..], &jdbc_batch[..]] {
        for steps in [
            &[(true, 1)][..],
            &[(false, 1)],
            &[(true, 3), (false, 7)],
            &[(false, 1000)],
        ] {
            check(ops, steps).unwrap();
        }
    }
}

#[test]
fn release_memory_keeps_a_small_queue_and_frees_a_large_one() {
    let mut r = R::new();
    send(&mut r, &[Query]);
    feed(&mut r, &[frame(b'C', b"SELECT 1\0"), z(b'I')]);
    r.release_memory(8);
    let kept = r.slots.capacity();
    assert!(kept > 0 && kept <= 8, "a point query's queue stays: {kept}");
    // A long pipeline's queue goes once it is answered.
    for _ in 0..100 {
        send(&mut r, &[Parse, Bind, Execute]);
    }
    send(&mut r, &[Sync]);
    let mut replies = Vec::new();
    for _ in 0..100 {
        replies.extend([frame(b'1', b""), frame(b'2', b""), frame(b'C', b"SELECT 1\0")]);
    }
    replies.push(z(b'I'));
    feed(&mut r, &replies);
    assert!(r.slots.capacity() > 8);
    r.release_memory(8);
    assert_eq!(r.slots.capacity(), 0);
}
