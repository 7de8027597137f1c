//! The verbs backend across processes, on softverbs: the project's own
//! `afmesh` binary under `LD_PRELOAD=libsoftverbs.so` (what a preloaded
//! provider looks like to afmesh), every rank forced onto verbs.

#![allow(clippy::unwrap_used)]

#[path = "common/cdylib.rs"]
mod cdylib;
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{afmesh, rank_command, scheduler, Proc};

fn softverbs() -> String {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("softverbs/src");
    cdylib::built("libsoftverbs.so", &[src])
        .to_string_lossy()
        .into_owned()
}

fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\":");
    let at = json
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + k.len();
    let rest = &json[at..];
    &rest[..rest.find([',', '}']).unwrap()]
}

fn num(json: &str, key: &str) -> u64 {
    field(json, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {json}"))
}

/// A softverbs fabric of its own per test, so parallel tests never meet.
fn fabric_env(tag: &str) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), softverbs()),
        ("AFMESH_TRANSPORT".into(), "verbs".into()),
        (
            "SOFTVERBS_NAMESPACE".into(),
            format!("afmesh-{tag}-{}", std::process::id()),
        ),
        (
            "AFMESH_JOB".into(),
            format!("verbs-{tag}-{}", std::process::id()),
        ),
    ]
}

struct Mesh {
    sched: Proc,
    ranks: Vec<Proc>,
}

/// M attention and N FFN ranks over verbs running `afmesh run --json`
/// with `args`; `per_rank` adds environment to one rank ("A0", "F1").
fn start(
    tag: &str,
    m: u32,
    n: u32,
    args: &[&str],
    env: &[(&str, &str)],
    per_rank: &[(&str, &str, &str)],
) -> Mesh {
    let (sched, addr) = scheduler(&[]);
    let mut base = fabric_env(tag);
    base.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut ranks = Vec::new();
    for (role, count, tag) in [("ffn", n, "F"), ("attention", m, "A")] {
        for r in 0..count {
            let who = format!("{tag}{r}");
            let mut e: Vec<(&str, &str)> =
                base.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            for (w, k, v) in per_rank {
                if *w == who {
                    e.push((k, v));
                }
            }
            let mut a = vec!["--json"];
            a.extend_from_slice(args);
            let cmd = rank_command(role, r, &addr, m, n, &a, &e);
            ranks.push(Proc::spawn(&who, cmd));
        }
    }
    Mesh { sched, ranks }
}

/// Runs a mesh to its end; every rank must succeed verified. Returns each
/// rank's JSON line (FFN ranks first).
fn run_verified(tag: &str, m: u32, n: u32, args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let mut mesh = start(tag, m, n, args, env, &[]);
    let mut lines = Vec::new();
    for p in &mut mesh.ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert!(st.success(), "{} failed:\n{out}", p.name);
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{}: no JSON line:\n{out}", p.name))
            .to_string();
        assert_eq!(field(&line, "errors"), "0", "{}: {line}", p.name);
        assert_eq!(field(&line, "transport"), "\"verbs\"", "{line}");
        lines.push(line);
    }
    let st = mesh.sched.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", mesh.sched.output());
    lines
}

/// The post path's promises, from a rank's counters: no registration and
/// no payload copy after setup, `stripes` work requests per message (plus
/// flushes and probes, counted apart).
fn assert_counters(line: &str, stripes: u64) {
    let messages = num(line, "messages");
    assert!(messages > 0, "{line}");
    assert_eq!(num(line, "registrations_after_setup"), 0, "{line}");
    assert_eq!(num(line, "copied_bytes"), 0, "{line}");
    let data = num(line, "work_requests") - num(line, "flushes");
    assert_eq!(
        data,
        messages * stripes,
        "work requests per message: {line}"
    );
    assert!(
        num(line, "signaled") <= num(line, "work_requests"),
        "{line}"
    );
}

#[test]
fn one_by_one_reference_sizes_verified() {
    let lines = run_verified("1x1", 1, 1, &["--iters", "5", "--warmup", "2"], &[]);
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// Four QPs per link: the reference messages (0.9 and 1.8 MB) are striped
/// over QPs 1..3, three work requests each, and still land once.
#[test]
fn two_by_two_four_qps_striped_verified() {
    let lines = run_verified(
        "2x2q4",
        2,
        2,
        &["--iters", "5", "--warmup", "2"],
        &[("AFMESH_QPS", "4")],
    );
    for l in &lines {
        assert_counters(l, 3);
    }
}

/// A JSON array of numbers (`"rail_messages":[3,4]`).
fn nums(json: &str, key: &str) -> Vec<u64> {
    let k = format!("\"{key}\":[");
    let at = json
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + k.len();
    let rest = &json[at..];
    let body = &rest[..rest.find(']').unwrap()];
    body.split(',')
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{key} in {json}")))
        .collect()
}

/// A rank's per-rail counters: `rails` rails, each carrying messages
/// and bytes, adding up to the rank's messages.
fn assert_rails(line: &str, rails: usize) {
    assert_eq!(num(line, "rails") as usize, rails, "{line}");
    let msgs = nums(line, "rail_messages");
    let bytes = nums(line, "rail_bytes");
    assert_eq!((msgs.len(), bytes.len()), (rails, rails), "{line}");
    assert!(
        msgs.iter().all(|&m| m > 0),
        "every rail carried messages: {line}"
    );
    assert!(
        bytes.iter().all(|&b| b > 0),
        "every rail carried bytes: {line}"
    );
    assert_eq!(msgs.iter().sum::<u64>(), num(line, "messages"), "{line}");
}

/// Two NICs per rank (`AFMESH_IB_DEVICE=softverbs0,softverbs1`): a 2A2F
/// mesh verified, its links spread over both rails on every rank (rail
/// i meets rail i: A_a and F_f meet on rail (a + f) mod 2), and the post
/// path's promises kept.
#[test]
fn two_rails_per_rank_2x2_verified() {
    let lines = run_verified(
        "rails",
        2,
        2,
        &["--iters", "5", "--warmup", "2"],
        &[
            ("SOFTVERBS_DEVICES", "2"),
            ("AFMESH_IB_DEVICE", "softverbs0,softverbs1"),
        ],
    );
    for l in &lines {
        assert_counters(l, 1);
        assert_rails(l, 2);
    }
}

/// Two rails on the attention ranks, one on the FFN ranks: links pair
/// the rails round-robin (said in the log), all verified; the attention
/// ranks still use both of theirs.
#[test]
fn mismatched_rail_counts_pair_round_robin() {
    let two = "softverbs0,softverbs1";
    let mut mesh = start(
        "railmix",
        2,
        2,
        &["--iters", "3", "--warmup", "1"],
        &[("SOFTVERBS_DEVICES", "2")],
        &[
            ("A0", "AFMESH_IB_DEVICE", two),
            ("A1", "AFMESH_IB_DEVICE", two),
            ("A0", "AFMESH_LOG", "afmesh=info"),
            ("F0", "AFMESH_IB_DEVICE", "softverbs1"),
            ("F1", "AFMESH_IB_DEVICE", "softverbs0"),
        ],
    );
    let mut lines = Vec::new();
    for p in &mut mesh.ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert!(st.success(), "{}:\n{out}", p.name);
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap()
            .to_string();
        assert_eq!(field(&line, "errors"), "0", "{line}");
        assert_counters(&line, 1);
        lines.push((p.name.clone(), line, out));
    }
    for (who, line, out) in &lines {
        let rails = if who.starts_with('A') { 2 } else { 1 };
        assert_rails(line, rails);
        if who == "A0" {
            assert!(
                out.contains("paired round-robin"),
                "A0 says how it paired the rails:\n{out}"
            );
        }
    }
    assert!(mesh.sched.wait_exit(Duration::from_secs(10)).success());
}

/// Odd sizes, wider types, 3×2, one QP.
#[test]
fn three_by_two_odd_sizes_verified() {
    let args = [
        "--tokens",
        "7",
        "--hidden",
        "33",
        "--dispatch-dtype",
        "bf16",
        "--combine-dtype",
        "f32",
        "--iters",
        "5",
        "--warmup",
        "1",
    ];
    let lines = run_verified("3x2", 3, 2, &args, &[("AFMESH_QPS", "1")]);
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// Eight-byte payloads (one fp8 row of 8), inline, on four QPs: small
/// messages stay one work request on QP 0.
#[test]
fn eight_byte_messages_verified() {
    let args = [
        "--tokens",
        "1",
        "--hidden",
        "8",
        "--dispatch-dtype",
        "fp8",
        "--combine-dtype",
        "fp8",
        "--iters",
        "20",
        "--warmup",
        "2",
    ];
    let lines = run_verified("8b", 1, 1, &args, &[("AFMESH_QPS", "4")]);
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// 4 MiB messages each way (512 rows of 4096 bf16), one QP and four.
#[test]
fn four_mib_messages_verified() {
    let args = [
        "--tokens",
        "512",
        "--hidden",
        "4096",
        "--dispatch-dtype",
        "bf16",
        "--combine-dtype",
        "bf16",
        "--stages",
        "1",
        "--iters",
        "3",
        "--warmup",
        "1",
    ];
    for (qps, stripes) in [("1", 1), ("4", 3)] {
        let lines = run_verified(&format!("4m{qps}"), 1, 1, &args, &[("AFMESH_QPS", qps)]);
        for l in &lines {
            assert_counters(l, stripes);
        }
    }
}

/// Ranks that stop with an error: each must exit 1 (never a signal or a
/// hang) reporting a lost peer, and name `who`.
fn assert_all_lost(mesh: &mut Mesh, skip: Option<usize>, who: &str) {
    for (i, p) in mesh.ranks.iter_mut().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let st = p.wait_exit(Duration::from_secs(15));
        let out = p.output();
        assert_eq!(st.code(), Some(1), "{} must fail, not hang:\n{out}", p.name);
        assert!(
            out.contains("peer lost") || out.contains("lost"),
            "{} must report a lost peer:\n{out}",
            p.name
        );
        assert!(!out.contains("panicked"), "{}:\n{out}", p.name);
    }
    let text: String = mesh.ranks.iter().map(|p| p.output()).collect();
    assert!(text.contains(who), "someone names {who}:\n{text}");
}

const ENDLESS: [&str; 8] = [
    "--tokens",
    "16",
    "--hidden",
    "1024",
    "--iters",
    "1000000",
    "--timeout-ms",
    "3000",
];

/// SIGKILL of an FFN rank mid-run: every other rank sees a lost peer
/// within its timeout (the attention ranks through their failed writes or
/// probes, the other FFN rank through the attention ranks leaving).
#[test]
fn sigkill_of_a_rank_is_peer_lost_everywhere() {
    let mut mesh = start("kill", 2, 2, &ENDLESS, &[], &[]);
    for p in &mesh.ranks {
        p.wait_line(Duration::from_secs(20), |l| l.contains("joined"));
    }
    // FFN ranks come first: index 1 is F1.
    mesh.ranks[1].kill();
    assert_all_lost(&mut mesh, Some(1), "F1");
    let st = mesh.sched.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", mesh.sched.output());
}

/// An error completion injected by softverbs' fault switch on A0's 40th
/// work request: the link goes down with the verbs status named, A0 and
/// its peer see a lost peer, nothing hangs.
#[test]
fn injected_error_completion_is_peer_lost() {
    let mut mesh = start(
        "fault",
        1,
        1,
        &ENDLESS,
        &[],
        &[("A0", "SOFTVERBS_FAIL_WR", "40:10")],
    );
    assert_all_lost(&mut mesh, None, "F0");
    let a0 = mesh.ranks[1].output();
    assert!(
        a0.contains("IBV_WC_REM_ACCESS_ERR") && a0.contains("softverbs0:1"),
        "A0 names the status and the rail's device:\n{a0}"
    );
    let st = mesh.sched.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", mesh.sched.output());
}

/// One rank on verbs that cannot start: it fails at once with `what`.
fn lone_rank_fails(env: &[(&str, &str)], what: &[&str]) {
    let (_sched, addr) = scheduler(&[]);
    let mut cmd = rank_command("ffn", 0, &addr, 1, 1, &["--timeout-ms", "3000"], env);
    cmd.env("AFMESH_TRANSPORT", "verbs");
    let mut p = Proc::spawn("F0", cmd);
    let st = p.wait_exit(Duration::from_secs(20));
    let out = p.output();
    assert!(!st.success(), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(
        what.iter().any(|w| out.contains(w)),
        "expected one of {what:?}:\n{out}"
    );
}

#[test]
fn a_missing_verbs_library_is_named() {
    lone_rank_fails(
        &[("AFMESH_VERBS_LIB", "/nonexistent/libibverbs.so.1")],
        &["/nonexistent/libibverbs.so.1"],
    );
}

#[test]
fn no_rdma_device_is_named() {
    let so = softverbs();
    lone_rank_fails(
        &[("LD_PRELOAD", &so), ("SOFTVERBS_DEVICES", "0")],
        &["no RDMA device"],
    );
    // A named device that is not there.
    lone_rank_fails(
        &[("LD_PRELOAD", &so), ("AFMESH_IB_DEVICE", "mlx5_9")],
        &["no RDMA device \"mlx5_9\""],
    );
}

/// A bad name in a list of several NICs is an error naming it (the good
/// ones are not used alone), as is a device listed twice.
#[test]
fn a_bad_device_in_a_rail_list_is_named() {
    let so = softverbs();
    lone_rank_fails(
        &[
            ("LD_PRELOAD", &so),
            ("SOFTVERBS_DEVICES", "2"),
            ("AFMESH_IB_DEVICE", "softverbs0,mlx5_9,softverbs1"),
        ],
        &["no RDMA device \"mlx5_9\""],
    );
    lone_rank_fails(
        &[
            ("LD_PRELOAD", &so),
            ("SOFTVERBS_DEVICES", "2"),
            ("AFMESH_IB_DEVICE", "softverbs1,softverbs1"),
        ],
        &["softverbs1 is listed twice"],
    );
    lone_rank_fails(
        &[
            ("LD_PRELOAD", &so),
            ("SOFTVERBS_DEVICES", "2"),
            ("AFMESH_IB_DEVICE", "softverbs1:1,softverbs1"),
        ],
        &["softverbs1:1 is listed twice"],
    );
}

/// The binary and the C library do not link libibverbs: they start where
/// rdma-core is absent.
#[test]
fn the_binary_and_c_library_do_not_link_libibverbs() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_afmesh"));
    let mut files = vec![exe.clone()];
    // libafmesh.so, when this profile has built it (`cargo build --workspace`).
    if let Some(so) = exe
        .parent()
        .map(|d| d.join("libafmesh.so"))
        .filter(|p| p.exists())
    {
        files.push(so);
    }
    for f in files {
        let Ok(out) = std::process::Command::new("ldd").arg(&f).output() else {
            eprintln!("no ldd here; skipped");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {text}", f.display());
        assert!(!text.contains("libibverbs"), "{}: {text}", f.display());
    }
}

/// `auto` with softverbs preloaded takes verbs and logs why per link.
#[test]
fn auto_prefers_verbs_when_a_port_is_active() {
    let (mut sched, addr) = scheduler(&[]);
    let mut ranks = Vec::new();
    for (role, who) in [("ffn", "F0"), ("attention", "A0")] {
        let env = fabric_env("auto");
        let mut e: Vec<(&str, &str)> = env
            .iter()
            .filter(|(k, _)| k != "AFMESH_TRANSPORT")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        e.push(("AFMESH_LOG", "info"));
        let cmd = rank_command(
            role,
            0,
            &addr,
            1,
            1,
            &["--iters", "3", "--warmup", "1", "--json"],
            &e,
        );
        ranks.push(Proc::spawn(who, cmd));
    }
    for p in &mut ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert!(st.success(), "{out}");
        assert!(
            out.contains(": verbs (host"),
            "link logged on verbs:\n{out}"
        );
        assert!(out.contains("\"transport\":\"verbs\""), "{out}");
    }
    let _ = afmesh();
    assert!(sched.wait_exit(Duration::from_secs(10)).success());
}

/// `AFMESH_VERBS_LIB` names the library to load: softverbs by path, with
/// nothing preloaded.
#[test]
fn an_explicit_verbs_library_is_loaded() {
    let so = softverbs();
    let lines = run_verified(
        "explicit",
        1,
        1,
        &["--iters", "3", "--warmup", "1"],
        &[("LD_PRELOAD", ""), ("AFMESH_VERBS_LIB", &so)],
    );
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// Ends asking for different QP counts use the smaller on each link.
#[test]
fn mismatched_qp_counts_use_the_smaller() {
    let mut mesh = start(
        "qpmix",
        1,
        2,
        &["--iters", "3", "--warmup", "1"],
        &[],
        &[("A0", "AFMESH_QPS", "4"), ("F1", "AFMESH_QPS", "2")],
    );
    let mut lines = Vec::new();
    for p in &mut mesh.ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert!(st.success(), "{}:\n{out}", p.name);
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap()
            .to_string();
        assert_eq!(field(&line, "errors"), "0", "{line}");
        lines.push(line);
    }
    // F0 (1 QP) and F1 (2 QPs: its big messages on QP 1, one stripe) send
    // one work request per message; A0's links use 1 and 2 QPs, one each.
    for l in &lines {
        assert_counters(l, 1);
    }
    assert!(mesh.sched.wait_exit(Duration::from_secs(10)).success());
}

/// The matrix stage layout on one QP per link (RC keeps a QP's writes in
/// order): each dispatch is two writes, rows then head, one work request
/// each; every byte verified, the FFN ranks reading the matrix.
#[test]
fn matrix_layout_on_one_qp_verified() {
    let lines = run_verified(
        "matrix",
        2,
        2,
        &[
            "--iters",
            "4",
            "--warmup",
            "3",
            "--layout",
            "matrix",
            "--tokens",
            "64",
            "--hidden",
            "2048",
            "--vary-tokens",
        ],
        &[("AFMESH_QPS", "1")],
    );
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// With several QPs per link verbs stripes large writes, so a link's two
/// writes could land out of order: the matrix layout is refused, naming
/// the way out.
#[test]
fn matrix_layout_on_striped_qps_is_a_clear_error() {
    let mut mesh = start(
        "matrixq4",
        1,
        1,
        &["--layout", "matrix", "--iters", "1", "--warmup", "0"],
        &[("AFMESH_QPS", "4"), ("AFMESH_SETUP_TIMEOUT_MS", "5000")],
        &[],
    );
    for p in &mut mesh.ranks {
        let st = p.wait_exit(Duration::from_secs(30));
        let out = p.output();
        assert!(
            !st.success(),
            "{}:
{out}",
            p.name
        );
        assert!(!out.contains("panicked"), "{out}");
        assert!(
            out.contains("matrix stage layout") && out.contains("AFMESH_QPS=1"),
            "{}:
{out}",
            p.name
        );
    }
    mesh.sched.kill();
}

/// GPUDirect RDMA registration (device memory with verbs) has no NIC or
/// GPU here, so its error paths are what CI runs: the parent spawns this
/// test binary's `gpudirect_child` with softverbs preloaded.
#[test]
fn gpudirect_registration_errors_are_named() {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "gpudirect_child",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in fabric_env("gpudirect") {
        cmd.env(k, v);
    }
    cmd.env("AFMESH_TEST_GPUDIRECT_CHILD", "1");
    let mut p = Proc::spawn("gpudirect", cmd);
    let st = p.wait_exit(Duration::from_secs(20));
    let out = p.output();
    assert!(st.success(), "{out}");
    // The child really ran its checks (it prints this after them).
    assert!(out.contains("gpudirect checks passed"), "{out}");
}

/// Run by [`gpudirect_registration_errors_are_named`] under softverbs; a
/// no-op in the ordinary test run.
#[test]
fn gpudirect_child() {
    use afmesh::transport::sim::SimNetwork;
    use afmesh::transport::verbs::VerbsTransport;
    use afmesh::transport::{Access, Backend, MemoryKind, Mux, PollPolicy, Region, Transport};
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    if std::env::var_os("AFMESH_TEST_GPUDIRECT_CHILD").is_none() {
        return;
    }
    let device =
        || Arc::new(Region::host_standing_in_for(MemoryKind::Cuda { device: 0 }, 4096).unwrap());
    let mut t = VerbsTransport::new(1).unwrap();
    assert!(t.caps().moves(MemoryKind::Cuda { device: 0 }));

    // ibv_reg_dmabuf_mr: softverbs answers EOPNOTSUPP, as providers
    // without dma-buf support do; the error names the verb and errno.
    let fd = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: softverbs refuses every dma-buf without reading the fd.
    let e = unsafe { t.register_dmabuf(fd.as_raw_fd(), 0, 4096, 0x10000, Access::RemoteWrite) }
        .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("ibv_reg_dmabuf_mr"), "{m}");
    assert!(
        m.contains(&std::io::Error::from_raw_os_error(libc::EOPNOTSUPP).to_string()),
        "{m}"
    );

    if !afmesh::cuda::available() {
        // CUDA memory without a CUDA driver: CUDA's error, never a
        // fallback to ibv_reg_mr on what is not device memory.
        let e = t.register(&device(), Access::RemoteWrite).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("CUDA") && m.contains("verbs"), "{m}");
        assert!(matches!(e, afmesh::Error::Unsupported(_)), "{e:?}");

        // In a mux, a backend that cannot register device memory leaves
        // it (logged), and its links go to the others ...
        let net = SimNetwork::new(1);
        net.set_device_stand_in(true);
        let verbs = VerbsTransport::new(1).unwrap();
        let mut mux = Mux::new(
            vec![Backend::Verbs(verbs), Backend::Sim(net.endpoint())],
            PollPolicy::default(),
        );
        mux.register(&device(), Access::RemoteWrite).unwrap();
        mux.register(&device(), Access::Local).unwrap();
        let names: Vec<&str> = mux.backends().iter().map(|b| b.name()).collect();
        assert_eq!(names, ["sim"]);
        // ... and when it is the only one, its error is the rank's.
        let mut alone = Mux::new(
            vec![Backend::Verbs(VerbsTransport::new(1).unwrap())],
            PollPolicy::default(),
        );
        let m = alone
            .register(&device(), Access::RemoteWrite)
            .unwrap_err()
            .to_string();
        assert!(m.contains("CUDA") && m.contains("GPUDirect"), "{m}");
    }
    println!("gpudirect checks passed");
}

/// A rank that parks waits on every rail's completion channel in one
/// wait: with two rails, a link on rail 1 (ranks 1 and 0 meet there)
/// wakes a parked rank through the fds `wake()` hands the mux. The parent
/// runs [`rails_child`] in-process under softverbs with two devices.
#[test]
fn a_parked_rank_wakes_on_either_rail() {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["rails_child", "--exact", "--nocapture", "--test-threads=1"]);
    for (k, v) in fabric_env("railwake") {
        cmd.env(k, v);
    }
    cmd.env("SOFTVERBS_DEVICES", "2");
    cmd.env("AFMESH_IB_DEVICE", "softverbs0,softverbs1");
    cmd.env("AFMESH_TEST_RAILS_CHILD", "1");
    let mut p = Proc::spawn("rails", cmd);
    let st = p.wait_exit(Duration::from_secs(20));
    let out = p.output();
    assert!(st.success(), "{out}");
    assert!(out.contains("rail checks passed"), "{out}");
}

/// Run by [`a_parked_rank_wakes_on_either_rail`]; a no-op otherwise.
#[test]
fn rails_child() {
    use afmesh::transport::verbs::VerbsTransport;
    use afmesh::transport::{Access, Completion, LocalSlice, PeerSpec, Region, Transport, Wake};
    use std::sync::Arc;
    use std::time::Instant;

    if std::env::var_os("AFMESH_TEST_RAILS_CHILD").is_none() {
        return;
    }
    let spec = |label: &str, blob: Vec<u8>, initiator: bool, me: u32, peer: u32| PeerSpec {
        label: label.into(),
        blob,
        initiator,
        peer_rank: peer,
        my_rank: me,
        epoch: 1,
    };
    // A1 of 2 attention ranks, F0 of 1 FFN rank.
    let mut a = VerbsTransport::new(1).unwrap();
    let mut f = VerbsTransport::new(2).unwrap();
    assert_eq!((a.rail_count(), f.rail_count()), (2, 2));
    assert_eq!(a.device(), "softverbs0:1,softverbs1:1");
    let send = Arc::new(Region::alloc(4096).unwrap());
    let recv_a = Arc::new(Region::alloc(4096).unwrap());
    let recv_f = Arc::new(Region::alloc(4096).unwrap());
    let key = a.register(&send, Access::Local).unwrap().local;
    a.register(&recv_a, Access::RemoteWrite).unwrap();
    f.register(&recv_f, Access::RemoteWrite).unwrap();
    let (ea, ef) = (a.endpoint(), f.endpoint());
    // A1 and F0: (1 + 0) mod 2, rail 1 at both ends.
    let remote = a
        .connect(&[spec("F0", ef, true, 1, 0)], Duration::from_secs(5))
        .unwrap()[0]
        .remote[0];
    f.connect(&[spec("A1", ea, false, 0, 1)], Duration::from_secs(5))
        .unwrap();

    // F parks: its CQs armed, one fd per rail to wait on.
    let mut out = Vec::new();
    f.arm(&mut out).unwrap();
    assert!(out.is_empty(), "{out:?}");
    let Wake::Fds { read, .. } = f.wake() else {
        panic!("verbs waits on fds")
    };
    assert_eq!(read.len(), 2, "one completion channel per rail");
    let src = [LocalSlice {
        key,
        offset: 0,
        len: 64,
    }];
    a.post_write(0, &src, &remote, 0, Some(7), 7).unwrap();
    // The write lands on rail 1: one of F's fds turns readable.
    let mut fds: Vec<libc::pollfd> = read
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of pollfds for the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5000) };
    assert_eq!(n, 1, "the parked rank woke within 5 s");
    assert!(
        fds[1].revents & libc::POLLIN != 0,
        "rail 1's channel: {fds:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut arrived = false;
    while !arrived && Instant::now() < deadline {
        out.clear();
        f.progress(&mut out).unwrap();
        a.progress(&mut out).unwrap();
        arrived |= out.iter().any(|c| {
            matches!(
                c,
                Completion::Arrival {
                    imm: 7,
                    len: 64,
                    ..
                }
            )
        });
        std::thread::yield_now();
    }
    assert!(arrived, "the write arrived");
    let c = f.counters();
    assert_eq!(c.rails, 2);
    let c = a.counters();
    assert_eq!((c.rail_messages[0], c.rail_messages[1]), (0, 1), "{c:?}");
    assert_eq!(c.rail_bytes[1], 64, "{c:?}");
    println!("rail checks passed");
}
