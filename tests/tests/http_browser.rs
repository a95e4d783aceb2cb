//! The HTTP listener checked by real consumers: `/metrics` by Prometheus's
//! own linter (`promtool check metrics`, Debian's `prometheus` package), and
//! the status page rendered by headless Chromium (Debian's `chromium`): the
//! screenshot must show the pools table's header band and, under it, the
//! charts painted in their colours; the rendered DOM must list the pool's
//! database and user, and hold the charts with a line per pool.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PROMTOOL: &str = "/usr/bin/promtool";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The background of the pools table's header cells (`#pools th` in the
/// status page's inline CSS).
const POOLS_HEADER_RGB: [u8; 3] = [0x1f, 0x4e, 0x79];
/// The charts' colour of the second pool by name (`app/app rw`), and the
/// timeline's leader colour (`PALETTE[1]` and `LEADER` in
/// proxy/src/http/charts.rs).
const SECOND_LINE_RGB: [u8; 3] = [0x2c, 0xa0, 0x2c];
const LEADER_RGB: [u8; 3] = [0x6a, 0x3d, 0x9a];
/// The charts on the page.
const CHARTS: [&str; 5] = [
    "chart-tps",
    "chart-p99",
    "chart-waiting",
    "chart-servers",
    "chart-topology",
];

/// A ferry with pools in use: three transactions on the read-write port and
/// one on the read-only port (both clients stay connected), and one failed
/// login.
async fn busy_ferry() -> (pgferry_tests::Ferry, Vec<tokio_postgres::Client>) {
    let f = ferry("");
    let rw = app(&f).await;
    for _ in 0..3 {
        rw.simple_query("SELECT 1").await.unwrap();
    }
    let (ro, conn) = tokio_postgres::connect(&f.ro_conn_str("app", APP_PASS, "app"), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the read-only port: {e}\n{}", f.log()));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    ro.simple_query("SELECT 1").await.unwrap();
    let bad = tokio_postgres::connect(&f.rw_conn_str("app", "wrong", "app"), tokio_postgres::NoTls).await;
    assert!(bad.is_err(), "a wrong password must not log in");
    (f, vec![rw, ro])
}

/// Kills a whole process group (the program and any children it started).
#[allow(unsafe_code)]
fn kill_group(pgid: u32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
    }
}

/// Runs `cmd` in its own process group with `stdin` fed to it, and kills the
/// group if it has not exited after `limit` (and in any case once it has, so
/// that no helper process outlives the test). Panics on timeout.
fn run_bounded(mut cmd: Command, stdin: &[u8], limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let pgid = child.id();
    let input = stdin.to_vec();
    let mut child_in = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = child_in.write_all(&input);
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let timed_out = status.is_none();
    kill_group(pgid);
    let status = status.unwrap_or_else(|| child.wait().unwrap());
    let _ = feeder.join();
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    assert!(
        !timed_out,
        "{what} did not finish within {limit:?}; killed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A fresh empty directory under the system temp dir.
fn fresh_dir(prefix: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// Headless Chromium on `url` with `extra` arguments (a throwaway profile);
/// bounded to 90 s.
fn chromium(url: &str, extra: &[&str]) -> Output {
    let profile = fresh_dir("pgferry-chromium");
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1024",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .env("HOME", &profile);
    let out = run_bounded(cmd, b"", Duration::from_secs(90));
    let _ = std::fs::remove_dir_all(&profile);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_metrics() {
    let (f, _clients) = busy_ferry().await;
    let (code, body) = get(http_port(&f), "/metrics").await;
    assert_eq!(code, 200);
    for port in ["rw", "ro"] {
        assert!(
            body.lines()
                .any(|l| l.starts_with("pgferry_pool_transactions_total{") && l.contains(&format!("port=\"{port}\""))),
            "no {port} pool in /metrics:\n{body}"
        );
    }
    assert!(
        body.contains("\npgferry_auth_failures_total{reason=\"password\"} 1\n"),
        "the failed login:\n{body}"
    );

    let mut cmd = Command::new(PROMTOOL);
    cmd.args(["check", "metrics"]);
    let out = tokio::task::spawn_blocking(move || run_bounded(cmd, body.as_bytes(), Duration::from_secs(30)))
        .await
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {} \n{said}",
        out.status
    );
}

/// Rows of `img` (RGB or RGBA, 8 bit) where at least `min` pixels have
/// exactly the colour `rgb`.
fn rows_with_colour(img: &[u8], info: &png::OutputInfo, rgb: [u8; 3], min: usize) -> Vec<usize> {
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    (0..info.height as usize)
        .filter(|y| {
            let row = &img[y * info.line_size..][..info.width as usize * channels];
            row.chunks_exact(channels).filter(|px| px[..3] == rgb).count() >= min
        })
        .collect()
}

/// The text of the cells of each row of the table with `id` in serialized
/// HTML (Chromium's `--dump-dom`).
fn table_rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom
        .find(&format!("<table id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table #{id} in the DOM:\n{dom}"));
    let table = &dom[start..];
    let table = &table[..table.find("</table>").unwrap()];
    let text = |cell: &str| {
        let mut out = String::new();
        let mut in_tag = false;
        for ch in cell.chars() {
            match ch {
                '<' => in_tag = true,
                '>' => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.trim().to_owned()
    };
    table
        .split("<tr")
        .skip(1)
        .map(|row| row.split("<td").skip(1).map(|c| text(&format!("<td{c}"))).collect())
        .collect()
}

/// Pixels of `img` with exactly the colour `rgb`, per row.
fn colour_per_row(img: &[u8], info: &png::OutputInfo, rgb: [u8; 3]) -> Vec<usize> {
    let channels = if info.color_type == png::ColorType::Rgba { 4 } else { 3 };
    (0..info.height as usize)
        .map(|y| {
            let row = &img[y * info.line_size..][..info.width as usize * channels];
            row.chunks_exact(channels).filter(|px| px[..3] == rgb).count()
        })
        .collect()
}

/// The serialized `<svg id="{id}" ...>...</svg>` element in `dom`.
fn svg<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<svg id=\"{id}\""))
        .unwrap_or_else(|| panic!("no svg #{id} in the DOM:\n{dom}"));
    let svg = &dom[start..];
    &svg[..svg.find("</svg>").unwrap() + 6]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_screenshot_shows_pools() {
    let (f, mut clients) = busy_ferry().await;
    let port = http_port(&f);
    let url = format!("http://127.0.0.1:{port}/");
    // Traffic for the charts (a transaction every 100 ms), and time for
    // the history to hold a few 5 s samples of both pools.
    let rw = clients.remove(0);
    let traffic = tokio::spawn(async move {
        while rw.simple_query("SELECT 1").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, page) = get(port, "/").await;
        let tps = page.find("<svg id=\"chart-tps\"").map_or("", |i| &page[i..]);
        let tps = &tps[..tps.find("</svg>").unwrap_or(0)];
        // Both pools drawn, each line at least three samples long.
        let segments: Vec<usize> = tps
            .split("<path d=\"")
            .skip(1)
            .map(|p| p.split('"').next().unwrap_or("").matches(" L").count())
            .collect();
        if segments.len() >= 2 && segments.iter().all(|&n| n >= 2) && page.contains("class=\"leader\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no chart lines after 60 s:\n{page}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The rendered DOM: the pools table lists the pool (database, user, port).
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || chromium(&u, &["--dump-dom"]))
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chromium --dump-dom: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = table_rows(&dom, "pools");
    // Columns: database, user, node, port, clients active, clients waiting,
    // servers active, servers idle, transactions, ...
    for (port, xacts) in [("rw", 3), ("ro", 1)] {
        let pool = rows
            .iter()
            .find(|r| r.len() >= 9 && r[0] == "app" && r[1] == "app" && r[3] == port)
            .unwrap_or_else(|| panic!("no app/app {port} pool in the rendered pools table: {rows:?}\n{dom}"));
        assert!(
            pool[8].parse::<u64>().is_ok_and(|n| n >= xacts),
            "transactions column of the {port} pool: {pool:?}"
        );
    }

    // The charts: an svg each; the transactions chart has a line per pool,
    // with the pool's name; the timeline shows the leader.
    for id in CHARTS {
        let chart = svg(&dom, id);
        assert!(!chart.contains("class=\"empty\""), "#{id} is empty:\n{chart}");
    }
    let tps = svg(&dom, "chart-tps");
    for port in ["ro", "rw"] {
        let series = tps
            .split("<g class=\"series\"")
            .skip(1)
            .find(|g| g.contains(&format!("data-label=\"app/app {port} ")))
            .unwrap_or_else(|| panic!("no app/app {port} line in the transactions chart:\n{tps}"));
        assert!(series.contains("<path d=\"M"), "{series}");
    }
    assert!(
        tps.contains("<title id=\"chart-tps-title\">Transactions/s per pool</title>"),
        "{tps}"
    );
    let topology = svg(&dom, "chart-topology");
    assert!(
        topology.contains("<rect class=\"leader\"") && topology.contains(": leader from "),
        "{topology}"
    );

    // The screenshot: the pools table's header band is really painted.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http_browser_status_page.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let out = tokio::task::spawn_blocking(move || chromium(&url, &[&arg]))
        .await
        .unwrap();
    assert!(
        out.status.success() && shot.is_file(),
        "chromium --screenshot: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("status page screenshot: {}", shot.display());
    let mut reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()))
        .read_info()
        .unwrap();
    let mut img = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut img).unwrap();
    assert_eq!((info.width, info.height), (1280, 1024), "window size");
    let band = rows_with_colour(&img, &info, POOLS_HEADER_RGB, 300);
    // The header row is one text line high: many pixel rows, contiguous.
    assert!(
        band.len() >= 10 && band.last().unwrap() - band[0] < band.len() + 25,
        "no header band of #{:02x}{:02x}{:02x} at least 300 px wide in {}: rows {band:?}",
        POOLS_HEADER_RGB[0],
        POOLS_HEADER_RGB[1],
        POOLS_HEADER_RGB[2],
        shot.display()
    );
    // Under it, the charts: the rw pool's lines and legends, the leader's
    // bar in the timeline.
    for (what, rgb, min) in [
        ("chart lines", SECOND_LINE_RGB, 200),
        ("timeline leader", LEADER_RGB, 150),
    ] {
        let per_row = colour_per_row(&img, &info, rgb);
        let below: usize = per_row.iter().skip(band[0]).sum();
        assert!(
            below >= min,
            "{what}: {below} pixels of #{:02x}{:02x}{:02x} under the pools table in {} (at least {min})",
            rgb[0],
            rgb[1],
            rgb[2],
            shot.display()
        );
    }
    traffic.abort();
}
