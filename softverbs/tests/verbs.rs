//! softverbs under real verbs programs: Debian's unchanged ibverbs-utils
//! (`ibv_devices`, `ibv_devinfo`, `ibv_rc_pingpong`, `ibv_srq_pingpong`)
//! and the small programs of `tests/c/semantics.c`, one test per semantic,
//! all with `LD_PRELOAD=libsoftverbs.so`. Each test uses its own fabric
//! namespace and removes it afterwards.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use support::{free_port, proc::Proc, Ns};

fn semantics_bin() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let bin = std::env::temp_dir().join(format!("softverbs-semantics-{}", std::process::id()));
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/semantics.c");
        let st = Command::new("cc")
            .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", src, "-o"])
            .arg(&bin)
            .arg("-libverbs")
            .status()
            .expect("cc runs");
        assert!(
            st.success(),
            "compiling semantics.c failed: is libibverbs-dev installed?"
        );
        bin
    })
}

/// Pingpong programs end with a race that real NICs win by their speed
/// (the side that finishes first tears down while the other's last sends
/// are in flight), so they run alone; the semantic programs share.
fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

static LOAD: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn run(name: &str, mut cmd: Command) -> String {
    cmd.env_remove("AFMESH_LOG");
    let mut p = Proc::spawn(name, cmd);
    let st = p.wait_exit(Duration::from_secs(60));
    let out = p.output();
    assert!(st.success(), "{name} failed ({st}):\n{out}");
    out
}

fn semantic(case: &str, arg: Option<&str>, env: &[(&str, &str)]) {
    let _g = shared();
    let ns = Ns::new(case);
    let mut c = ns.cmd(semantics_bin());
    c.arg(case);
    if let Some(a) = arg {
        c.arg(a);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = run(case, c);
    assert!(out.contains(&format!("{case} ok")), "{out}");
    // Every object file was removed; only the namespace's table remains.
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("softverbs.{}.", ns.0)) && !n.ends_with(".fabric"))
        .collect();
    assert!(left.is_empty(), "{case} left {left:?}");
}

#[test]
fn devices_default() {
    semantic("devices", None, &[]);
}

#[test]
fn devices_by_count_and_by_name() {
    semantic("devices", Some("3"), &[("SOFTVERBS_DEVICES", "3")]);
    semantic(
        "devices",
        Some("mlx5_0,mlx5_1"),
        &[("SOFTVERBS_DEVICES", "mlx5_0,mlx5_1")],
    );
}

#[test]
fn devices_roce_link_layer() {
    semantic("devices", None, &[("SOFTVERBS_LINK_LAYER", "ethernet")]);
}

#[test]
fn memory_regions_keys_and_access_checks() {
    semantic("mr", None, &[]);
}

#[test]
fn regions_at_an_iova_are_named_by_it() {
    semantic("iova", None, &[]);
}

#[test]
fn fault_switch_fails_the_nth_work_request() {
    semantic(
        "fault-wr",
        None,
        &[("SOFTVERBS_FAULT", "wr:2:REM_ACCESS_ERR")],
    );
}

#[test]
fn fault_switch_per_queue_pair() {
    semantic(
        "fault-qp",
        None,
        &[("SOFTVERBS_FAULT", "qp:2:wr:1:ibv_wc_retry_exc_err")],
    );
}

#[test]
fn fault_switch_qp_fatal_raises_async_events() {
    semantic("fault-fatal", None, &[("SOFTVERBS_FAULT", "wr:1:fatal")]);
}

#[test]
fn fault_switch_port_down_and_up() {
    semantic(
        "fault-port",
        None,
        &[("SOFTVERBS_FAULT", "port-err:100,port-active:1500")],
    );
}

#[test]
fn fault_switch_typo_is_an_error() {
    semantic(
        "fault-typo",
        None,
        &[("SOFTVERBS_FAULT", "wr:1:REM_ACCES_ERR")],
    );
}

#[test]
fn qp_state_machine_and_attribute_masks() {
    semantic("qp-state", None, &[]);
}

#[test]
fn cq_overflow_is_an_error() {
    semantic("cq-overflow", None, &[]);
}

#[test]
fn send_recv_write_imm_read_inline_unsignaled_sge() {
    semantic("ops", None, &[]);
}

#[test]
fn shared_receive_queue() {
    semantic("srq", None, &[]);
}

#[test]
fn atomics_fetch_add_and_compare_swap() {
    semantic("atomic", None, &[]);
}

#[test]
fn srq_limit_event_fires_once() {
    semantic("srq-limit", None, &[]);
}

#[test]
fn completion_channel_blocks_and_wakes() {
    semantic("channel", None, &[]);
}

#[test]
fn completion_channel_fd_wakes_poll_across_processes() {
    semantic("channel", Some("fd"), &[]);
}

#[test]
fn rnr_retries_then_error_or_success() {
    semantic("rnr", None, &[]);
}

#[test]
fn bad_rkey_is_remote_access_error_then_flush() {
    semantic("rkey", None, &[]);
}

#[test]
fn remote_access_needs_flag_same_pd_and_live_key() {
    semantic("access", None, &[]);
}

#[test]
fn devices_keep_their_own_objects_and_keys() {
    semantic("rails", None, &[("SOFTVERBS_DEVICES", "2")]);
}

#[test]
fn short_receive_is_a_length_error_on_both_sides() {
    semantic("recv-len", None, &[]);
}

#[test]
fn one_sided_write_lands_without_the_target() {
    semantic("one-sided", None, &[]);
}

#[test]
fn peer_exit_completes_with_retry_exceeded() {
    semantic("peer-exit", None, &[]);
}

#[test]
fn peer_sigkill_completes_with_retry_exceeded() {
    semantic("peer-exit", Some("kill"), &[]);
}

fn tool(name: &str) -> PathBuf {
    let p = Path::new("/usr/bin").join(name);
    assert!(p.exists(), "{} missing: install ibverbs-utils", p.display());
    p
}

#[test]
fn ibv_devices_and_ibv_devinfo_list_soft_devices() {
    let ns = Ns::new("utils");
    let out = run("ibv_devices", ns.cmd(tool("ibv_devices")));
    assert!(out.contains("softverbs0"), "{out}");
    let mut c = ns.cmd(tool("ibv_devinfo"));
    c.env("SOFTVERBS_DEVICES", "2");
    let out = run("ibv_devinfo", c);
    assert!(
        out.contains("hca_id:\tsoftverbs0") && out.contains("hca_id:\tsoftverbs1"),
        "{out}"
    );
    assert!(
        out.contains("PORT_ACTIVE") && out.contains("link_layer:\t\tInfiniBand"),
        "{out}"
    );
}

/// Server and client of an unchanged Debian pingpong binary.
fn pingpong(program: &str, args: &[&str], env: &[(&str, &str)]) {
    let _g = exclusive();
    let ns = Ns::new(program);
    let port = free_port();
    let mk = |client: bool| {
        let mut c = ns.cmd(tool(program));
        c.args(["-p", &port]).args(args);
        if client {
            c.arg("127.0.0.1");
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c
    };
    let mut server = Proc::spawn("server", mk(false));
    // The server listens before it prints anything; retry the client's
    // connection the way a user would, bounded.
    let mut client = None;
    for _ in 0..50 {
        let mut c = Proc::spawn("client", mk(true));
        let st = c.wait_exit(Duration::from_secs(60));
        let out = c.output();
        if st.success() {
            client = Some(out);
            break;
        }
        assert!(out.contains("Couldn't connect"), "client failed:\n{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = client.expect("client connected");
    let st = server.wait_exit(Duration::from_secs(60));
    let sout = server.output();
    assert!(st.success(), "server failed:\n{sout}");
    for out in [&client, &sout] {
        assert!(
            out.contains("iters in") && out.contains("usec/iter"),
            "{out}"
        );
    }
}

#[test]
fn rc_pingpong_default() {
    pingpong("ibv_rc_pingpong", &[], &[]);
}

#[test]
fn rc_pingpong_events_small_checked() {
    pingpong(
        "ibv_rc_pingpong",
        &["-e", "-s", "64", "-n", "2000", "-c"],
        &[],
    );
}

#[test]
fn rc_pingpong_large_gid_checked() {
    pingpong(
        "ibv_rc_pingpong",
        &["-s", "1048576", "-n", "20", "-c", "-g", "0"],
        &[],
    );
}

#[test]
fn rc_pingpong_roce_gid() {
    pingpong(
        "ibv_rc_pingpong",
        &["-g", "3", "-s", "8192", "-n", "200"],
        &[("SOFTVERBS_LINK_LAYER", "ethernet")],
    );
}

#[test]
fn srq_pingpong_default() {
    pingpong("ibv_srq_pingpong", &["-n", "500"], &[]);
}

#[test]
fn srq_pingpong_events_checked() {
    pingpong(
        "ibv_srq_pingpong",
        &["-e", "-s", "100", "-q", "4", "-c"],
        &[],
    );
}
