//! The wire protocol through pgferry in transaction mode: simple and
//! extended queries, pipelines, errors, COPY, large values, FunctionCall.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use pgferry_protocol::encode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_extended_and_prepared_queries() {
    let f = ferry("[pool]\npool_size = 2\n");
    let c = app(&f).await;
    // Several statements in one simple query.
    let msgs = c.simple_query("SELECT 1; SELECT 'two'; SELECT 3").await.unwrap();
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["1", "two", "3"]);
    // Extended protocol with parameters; prepared statement reused.
    let st = c.prepare("SELECT $1::int + $2::int").await.unwrap();
    for i in 0..20 {
        let r = c.query_one(&st, &[&i, &1]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), i + 1);
    }
    // An empty query.
    let raw = &mut Raw::login(f.rw_port, "app", APP_PASS).await;
    assert_eq!(tags(&raw.query("").await), "I Z");
    // A NOTICE arrives before the command completes.
    let r = raw.query("DO $$ BEGIN RAISE NOTICE 'hello'; END $$").await;
    assert_eq!(tags(&r), "N C Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_mid_transaction_and_mid_pipeline() {
    let f = ferry("[pool]\npool_size = 1\n");
    let mut c = app(&f).await;
    let tx = c.transaction().await.unwrap();
    tx.execute("SELECT 1", &[]).await.unwrap();
    let e = tx.execute("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22012");
    let e = tx.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "25P02", "in a failed transaction");
    tx.rollback().await.unwrap();
    assert_eq!(c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);

    // Raw pipeline: ok, error, skipped, Sync, then a second batch that works.
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    let mut b = BytesMut::new();
    for sql in ["SELECT 1", "SELECT 1/0", "SELECT 2"] {
        encode::parse(&mut b, b"", sql.as_bytes(), &[0, 0]);
        encode::bind(&mut b, b"", b"", &[0, 0, 0, 0, 0, 0]);
        encode::execute(&mut b, b"", 0);
    }
    encode::sync(&mut b);
    encode::parse(&mut b, b"", b"SELECT 3", &[0, 0]);
    encode::bind(&mut b, b"", b"", &[0, 0, 0, 0, 0, 0]);
    encode::execute(&mut b, b"", 0);
    encode::sync(&mut b);
    r.send(&b).await;
    let first = r.until_ready().await;
    assert_eq!(tags(&first), "1 2 D C 1 E Z", "1/0 is folded at Bind");
    assert_eq!(error_code(&first).as_deref(), Some("22012"));
    let second = r.until_ready().await;
    assert_eq!(tags(&second), "1 2 D C Z");
    assert_eq!(rows(&second), vec![vec![Some("3".to_string())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_of_1000_executes_with_one_sync() {
    let f = ferry("[pool]\npool_size = 1\n");
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    let mut b = BytesMut::new();
    encode::parse(&mut b, b"pipe", b"SELECT $1::int * 2", &[0, 0]);
    for i in 0..1000i32 {
        let v = i.to_string();
        encode::message(&mut b, b'B', |m| {
            m.put_slice(b"\0pipe\0");
            m.put_i16(0);
            m.put_i16(1);
            m.put_i32(v.len() as i32);
            m.put_slice(v.as_bytes());
            m.put_i16(0);
        });
        encode::execute(&mut b, b"", 0);
    }
    encode::sync(&mut b);
    r.send(&b).await;
    let out = r.until_ready().await;
    let values: Vec<i32> = rows(&out)
        .iter()
        .map(|row| row[0].as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(values, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
    assert_eq!(out.iter().filter(|f| f.tag == b'2').count(), 1000);
    assert_eq!(out.last().unwrap().body(), b"I");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_one_million_rows_in_and_out() {
    use futures_util::{SinkExt, StreamExt};
    let f = ferry("[pool]\npool_size = 2\n");
    let c = app(&f).await;
    c.batch_execute("DROP TABLE IF EXISTS copy_t; CREATE TABLE copy_t (id int, v text)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY copy_t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut chunk = BytesMut::new();
    let mut sent_sum: i64 = 0;
    for i in 0..1_000_000i64 {
        sent_sum += i;
        chunk.extend_from_slice(format!("{i}\tvalue-{i}\n").as_bytes());
        if chunk.len() > 64 * 1024 {
            sink.send(chunk.split().freeze()).await.unwrap();
        }
    }
    sink.send(chunk.split().freeze()).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1_000_000);
    let server_sum: i64 = c
        .query_one("SELECT sum(id)::int8 FROM copy_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(server_sum, sent_sum);
    let md5_server: String = c
        .query_one(
            "SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM copy_t",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let stream = c
        .copy_out("COPY (SELECT id, v FROM copy_t ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut data = Vec::new();
    while let Some(b) = stream.next().await {
        data.extend_from_slice(&b.unwrap());
    }
    let text = String::from_utf8(data).unwrap();
    let mut lines = 0;
    let mut joined = String::new();
    for (i, line) in text.lines().enumerate() {
        let (id, v) = line.split_once('\t').unwrap();
        if i > 0 {
            joined.push(',');
        }
        joined.push_str(&format!("{id}:{v}"));
        lines += 1;
    }
    assert_eq!(lines, 1_000_000);
    let md5_client: String = c.query_one("SELECT md5($1)", &[&joined]).await.unwrap().get(0);
    assert_eq!(md5_client, md5_server, "COPY OUT returned exactly what COPY IN stored");
    c.batch_execute("DROP TABLE copy_t").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabyte_value_round_trips() {
    let f = ferry("[pool]\npool_size = 1\n");
    let c = app(&f).await;
    let big: String = "abcdefghij".repeat(5 * 1024 * 1024);
    let r = c
        .query_one("SELECT length($1::text), md5($1::text), $1::text", &[&big])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i32>(0) as usize, big.len());
    let echoed: String = r.get(2);
    assert!(echoed == big, "50 MB value came back unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_message() {
    let f = ferry("[pool]\npool_size = 1\n");
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    // int4pl (oid 177): 40 + 2, binary arguments and result.
    let mut b = BytesMut::new();
    encode::message(&mut b, b'F', |m| {
        m.put_u32(177);
        m.put_i16(1);
        m.put_i16(1);
        m.put_i16(2);
        for v in [40i32, 2] {
            m.put_i32(4);
            m.put_i32(v);
        }
        m.put_i16(1);
    });
    r.send(&b).await;
    let out = r.until_ready().await;
    assert_eq!(tags(&out), "V Z");
    assert_eq!(&out[0].body()[4..8], &42i32.to_be_bytes());
}
