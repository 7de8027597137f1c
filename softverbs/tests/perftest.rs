//! softverbs under Debian's unchanged `perftest` (`ib_write_bw`,
//! `ib_write_lat`, `ib_send_lat`, `ib_read_bw`, `ib_send_bw`,
//! `ib_atomic_bw`): server and client
//! processes over loopback with perftest's own TCP exchange (no rdma_cm),
//! RC, default options unless a test says otherwise. Each pair runs alone
//! (both sides busy-poll), every wait is bounded, and both processes are
//! killed on every path out (`Proc`'s drop). A missing binary skips the
//! test with the reason printed (`scripts/test` installs `perftest`).

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{free_port, proc::Proc, Ns};

static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn binary(name: &str) -> Option<PathBuf> {
    let p = Path::new("/usr/bin").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} missing (install Debian's perftest package)",
            p.display()
        );
        None
    }
}

/// The result row of a perftest report: the first line after the
/// `#bytes` header whose first field is the message size. Returns its
/// numeric fields.
fn result_row(out: &str) -> Option<Vec<f64>> {
    let mut lines = out
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("#bytes"));
    lines.next()?;
    let row = lines.find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('-'))?;
    row.split_whitespace().map(|w| w.parse().ok()).collect()
}

/// Runs `program args` as server and client (the client retried, bounded,
/// until the server listens) and returns both outputs.
fn pair(program: &str, args: &[&str], env: &[(&str, &str)]) -> Option<(String, String)> {
    let bin = binary(program)?;
    let _g = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Ns::new(program);
    let port = free_port();
    let mk = |client: bool| {
        let mut c = ns.cmd(&bin);
        c.args(["-p", &port]).args(args);
        if client {
            c.arg("localhost");
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c
    };
    let mut server = Proc::spawn("server", mk(false));
    let mut client_out = None;
    for _ in 0..100 {
        let mut c = Proc::spawn("client", mk(true));
        let st = c.wait_exit(Duration::from_secs(60));
        let out = c.output();
        if st.success() {
            client_out = Some(out);
            break;
        }
        assert!(
            out.contains("Couldn't connect") || out.contains("Unable to open"),
            "{program} client failed ({st}):\n{out}\nserver:\n{}",
            server.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = client_out.expect("the client connected within 100 tries");
    let st = server.wait_exit(Duration::from_secs(60));
    let sout = server.output();
    assert!(st.success(), "{program} server failed ({st}):\n{sout}");
    Some((sout, client))
}

/// Both sides report a bandwidth row for `bytes`-byte messages with a
/// positive average.
fn check_bw(program: &str, args: &[&str], env: &[(&str, &str)], bytes: f64) {
    let Some((server, client)) = pair(program, args, env) else {
        return;
    };
    for out in [&server, &client] {
        let row = result_row(out).unwrap_or_else(|| panic!("no result row:\n{out}"));
        // #bytes #iterations BW-peak BW-average MsgRate
        assert_eq!(row.len(), 5, "{out}");
        assert_eq!(row[0], bytes, "{out}");
        assert!(row[1] > 0.0 && row[3] > 0.0 && row[4] > 0.0, "{out}");
    }
}

/// The client (or both, for ping-pong tests) report a latency row for
/// `bytes`-byte messages: min ≤ typical ≤ max, all positive.
fn check_lat(program: &str, args: &[&str], env: &[(&str, &str)], bytes: f64) {
    let Some((server, client)) = pair(program, args, env) else {
        return;
    };
    for out in [&server, &client] {
        let Some(row) = result_row(out) else {
            // Some tests print their report on one side only.
            assert!(out.contains("local address"), "{out}");
            continue;
        };
        // #bytes #iterations t_min t_max t_typical t_avg t_stdev p99 p99.9
        assert!(row.len() >= 7, "{out}");
        assert_eq!(row[0], bytes, "{out}");
        assert!(row[1] > 0.0, "{out}");
        assert!(
            0.0 < row[2] && row[2] <= row[4] && row[4] <= row[3],
            "{out}"
        );
    }
    assert!(
        result_row(&client).is_some() || result_row(&server).is_some(),
        "no side reported:\nserver:\n{server}\nclient:\n{client}"
    );
}

#[test]
fn ib_write_bw_default() {
    check_bw("ib_write_bw", &[], &[], 65536.0);
}

#[test]
fn ib_write_lat_default() {
    check_lat("ib_write_lat", &[], &[], 2.0);
}

#[test]
fn ib_send_lat_default() {
    check_lat("ib_send_lat", &[], &[], 2.0);
}

#[test]
fn ib_read_bw_default() {
    check_bw("ib_read_bw", &[], &[], 65536.0);
}

/// RoCE-like ports (perftest picks the GID itself), 1 MiB messages over
/// two queue pairs.
#[test]
fn ib_write_bw_roce_two_qps_large() {
    check_bw(
        "ib_write_bw",
        &["-s", "1048576", "-n", "200", "-q", "2"],
        &[("SOFTVERBS_LINK_LAYER", "ethernet")],
        1048576.0,
    );
}

/// Completion events (`ibv_get_cq_event`) instead of polling: each side
/// waits for one event per completion it expects, so the initiator's
/// send completion must come before the peer's reply.
#[test]
fn ib_send_lat_events() {
    check_lat("ib_send_lat", &["-e", "-n", "500"], &[], 2.0);
}

/// Receives through a shared receive queue.
#[test]
fn ib_send_bw_srq() {
    check_bw("ib_send_bw", &["--use-srq", "-n", "500"], &[], 65536.0);
}

/// Fetch-and-add atomics (8 bytes each).
#[test]
fn ib_atomic_bw_default() {
    check_bw("ib_atomic_bw", &[], &[], 8.0);
}
