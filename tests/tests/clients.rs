//! Real clients through pgferry in transaction mode: psql, pgbench in all
//! three query modes, and Python drivers with their own protocol habits
//! (asyncpg: named statements with Describe; psycopg 3: server-side
//! prepared statements after a few executions, pipelines).

mod common;

use common::*;
use pgferry_tests::{shared_cluster, PG_BIN};
use std::process::Command;

fn pg_tool(name: &str) -> Command {
    Command::new(std::path::Path::new(PG_BIN).join(name))
}

#[test]
fn psql_runs_scripts_through_pgferry() {
    let f = ferry("[pool]\npool_size = 2\n");
    let mut child = pg_tool("psql")
        .arg(f.rw_conn_str("app", APP_PASS, "app"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"CREATE TEMP TABLE p (a int);\nSELECT 40 + 2;\n\\set x 7\nSELECT :x * 3;\nBEGIN;\nINSERT INTO p VALUES (1);\nCOMMIT;\nSELECT count(*) FROM p;\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("CREATE")
                && !l.starts_with("BEGIN")
                && !l.starts_with("INSERT")
                && !l.starts_with("COMMIT")
        })
        .collect();
    assert_eq!(lines, ["42", "21", "1"], "{text}");
}

fn pgbench(f: &pgferry_tests::Ferry, args: &[&str]) -> String {
    let out = pg_tool("pgbench")
        .env("PGPASSWORD", APP_PASS)
        .args(["-h", "127.0.0.1", "-p", &f.rw_port.to_string(), "-U", "app"])
        .args(args)
        .arg("app")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}\n{}", f.log());
    text
}

/// pgbench's tables are shared by the tests below: one at a time.
static PGBENCH_TABLES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pgbench_all_modes(extra_toml: &str, runtime: &str) {
    let _tables = PGBENCH_TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = shared_cluster();
    cluster
        .psql_primary("app", "GRANT ALL ON SCHEMA public TO app")
        .unwrap();
    let f = ferry(&format!("[pool]\npool_size = 3\n{extra_toml}"));
    pgbench(&f, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        // More clients than server connections, on two threads.
        let out = pgbench(&f, &["-n", "-M", mode, "-c", "10", "-j", "2", "-t", "150"]);
        assert!(
            out.contains("number of transactions actually processed: 1500/1500"),
            "{mode}: {out}"
        );
        assert!(
            out.contains("number of failed transactions: 0 (0.000%)"),
            "{mode}: {out}"
        );
    }
    let out = pgbench(&f, &["-n", "-S", "-M", "prepared", "-c", "12", "-j", "2", "-t", "300"]);
    assert!(out.contains("number of failed transactions: 0 (0.000%)"), "{out}");
    let log = f.log();
    assert!(log.contains(runtime), "pgferry did not start {runtime:?}:\n{log}");
}

#[test]
fn pgbench_in_all_query_modes_has_no_failures() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = pgferry_config::auto_threads(cores);
    pgbench_all_modes("", &format!("event_loops=1 scheduler=WorkStealing threads={threads}"));
}

/// Thread per core with more loops than cores: three server connections
/// serve sessions on four event loops, so connections opened by one loop's
/// reactor are used by sessions on the others (the fallback of checkout's
/// affinity), and one loop's clients wait for another loop's checkin.
#[test]
fn pgbench_on_four_event_loops() {
    pgbench_all_modes(
        "[runtime]\nworker_threads = 4\nscheduler = \"thread-per-core\"\n",
        "event_loops=4 scheduler=ThreadPerCore threads=4",
    );
}

/// tokio's work-stealing scheduler (the default) on two worker threads,
/// whatever the machine's cores.
#[test]
fn pgbench_on_the_work_stealing_runtime() {
    pgbench_all_modes(
        "[runtime]\nworker_threads = 2\nscheduler = \"work-stealing\"\n",
        "event_loops=1 scheduler=WorkStealing threads=2",
    );
}

/// One thread: a single current-thread event loop.
#[test]
fn pgbench_on_one_thread() {
    pgbench_all_modes(
        "[runtime]\nworker_threads = 1\n",
        "event_loops=1 scheduler=WorkStealing threads=1",
    );
}

fn python(script: &str, port: u16) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("PGFERRY_PORT", port.to_string())
        .env("PGFERRY_PASSWORD", APP_PASS)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python driver test failed (install with: pip install asyncpg 'psycopg[binary]'):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn asyncpg_prepared_statements_and_transactions() {
    let f = ferry("[pool]\npool_size = 2\n");
    python(
        r#"
import asyncio, os, asyncpg
async def client(i):
    c = await asyncpg.connect(host='127.0.0.1', port=int(os.environ['PGFERRY_PORT']), user='app',
                              password=os.environ['PGFERRY_PASSWORD'], database='app')
    for n in range(30):
        # asyncpg prepares a named statement per query text and caches it.
        assert await c.fetchval('SELECT $1::int + $2::int', i, n) == i + n
        async with c.transaction():
            await c.execute('SELECT pg_sleep(0)')
            assert await c.fetchval('SELECT $1::text', 'x%d' % n) == 'x%d' % n
        st = await c.prepare('SELECT $1::int * 2')
        assert await st.fetchval(n) == n * 2
    await c.execute("SET TimeZone = 'Asia/Tokyo'")
    assert await c.fetchval('SHOW TimeZone') == 'Asia/Tokyo'
    await c.close()
async def main():
    await asyncio.gather(*(client(i) for i in range(8)))
asyncio.run(main())
"#,
        f.rw_port,
    );
}

#[test]
fn psycopg3_prepared_statements_and_pipeline() {
    let f = ferry("[pool]\npool_size = 2\n");
    python(
        r#"
import os, threading, psycopg
def client(i):
    with psycopg.connect(host='127.0.0.1', port=int(os.environ['PGFERRY_PORT']), user='app',
                         password=os.environ['PGFERRY_PASSWORD'], dbname='app', prepare_threshold=1) as c:
        for n in range(30):
            # From the 2nd execution psycopg uses a server-side prepared statement.
            assert c.execute('SELECT %s::int + 1', (n,)).fetchone()[0] == n + 1
        with c.transaction():
            c.execute('CREATE TEMP TABLE IF NOT EXISTS t (a int)')
            c.execute('INSERT INTO t VALUES (%s)', (i,))
        with c.pipeline():
            cur = [c.execute('SELECT %s::int', (k,)) for k in range(20)]
        assert [x.fetchone()[0] for x in cur] == list(range(20))
threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
for t in threads: t.start()
for t in threads: t.join()
"#,
        f.rw_port,
    );
}
