//! `AFMESH_METRICS=ADDR:PORT`: a running rank answers a Prometheus scrape
//! over loopback with its live stats.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{rank_env, scheduler};

fn scrape(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn a_running_rank_answers_a_scrape() {
    let (_sched, addr) = scheduler(&[]);
    let work = [
        "--tokens",
        "2",
        "--hidden",
        "64",
        "--stages",
        "2",
        "--iters",
        "100000000",
        "--warmup",
        "0",
    ];
    let _f = rank_env("ffn", 0, &addr, 1, 1, &work, &[("AFMESH_JOB", "metrics")]);
    let a = rank_env(
        "attention",
        0,
        &addr,
        1,
        1,
        &work,
        &[
            ("AFMESH_JOB", "metrics"),
            ("AFMESH_METRICS", "127.0.0.1:0"),
            ("AFMESH_LOG", "afmesh=info"),
        ],
    );
    let line = a.wait_line(Duration::from_secs(30), |l| {
        l.contains("metrics at http://")
    });
    let at = line
        .split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .to_string();

    let (head, body) = scrape(&at, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let r = "rank=\"A0\"";
    assert_eq!(
        value(&body, &format!("afmesh_up{{{r}}}")),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, &format!("afmesh_link_up{{{r},peer=\"F0\"}}")),
        Some(1.0),
        "{body}"
    );
    assert!(
        body.contains("afmesh_info{rank=\"A0\",transport="),
        "{body}"
    );
    assert!(
        body.contains("# TYPE afmesh_round_trip_seconds histogram"),
        "{body}"
    );

    // The stats are live: layers and bytes grow between scrapes.
    let layers = |b: &str| value(b, &format!("afmesh_layers_total{{{r}}}")).unwrap();
    let first = layers(&body);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (_, b) = scrape(&at, "/metrics");
        if layers(&b) > first {
            break b;
        }
        assert!(Instant::now() < deadline, "layers stuck at {first}:\n{b}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let sent = value(
        &body,
        &format!("afmesh_bytes_sent_total{{{r},peer=\"F0\"}}"),
    )
    .unwrap();
    assert!(sent > 0.0, "{body}");
    let count = value(
        &body,
        &format!("afmesh_round_trip_seconds_count{{{r},peer=\"F0\"}}"),
    )
    .unwrap();
    let inf = value(
        &body,
        &format!("afmesh_round_trip_seconds_bucket{{{r},peer=\"F0\",le=\"+Inf\"}}"),
    )
    .unwrap();
    assert!(count > 0.0 && count == inf, "{body}");

    let (head, _) = scrape(&at, "/nothing");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
