//! The C ABI from C and C++: programs under `tests/c` and `tests/cpp`,
//! compiled with the system compilers against `include/afmesh.h` and the
//! built `libafmesh.so`, and run here: every NULL argument, a 2A×2F mesh
//! (library and caller buffers), a timeout and use after finalize, a peer
//! killed mid-layer, two threads on one handle (busy, interrupt, abort of
//! a blocked wait), runs under AddressSanitizer, the C++ wrappers (with
//! `-Wold-style-cast`), `AFMESH_LOG` reaching a C program's stderr; and the
//! exported symbols, which are exactly the header's functions, each in the
//! `AFMESH_0` version node.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/proc.rs"]
mod proc;

#[path = "../../tests/common/cdylib.rs"]
mod cdylib;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use proc::Proc;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory holding libafmesh.so, plus the SONAME link the loader
/// wants (`libafmesh.so.0`), in a scratch directory of this test run.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let so = cdylib::built(
            "libafmesh.so",
            &[root().join("src"), root().join("ffi/src")],
        );
        let dir = std::env::temp_dir().join(format!("afmesh-c-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["libafmesh.so", "libafmesh.so.0"] {
            let link = dir.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&so, &link).unwrap();
        }
        dir
    })
}

/// Compiles `src` (relative to the repository) into the scratch directory.
fn compile(compiler: &str, std: &str, src: &str, out: &str, extra: &[&str]) -> PathBuf {
    let dir = lib_dir();
    let bin = dir.join(out);
    let st = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-g"])
        .args(extra)
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join(src))
        .arg("-o")
        .arg(&bin)
        .arg("-L")
        .arg(dir)
        .arg("-lafmesh")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .status()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(st.success(), "{compiler} failed on {src}");
    bin
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn run_to_end(name: &str, cmd: Command, timeout: Duration) -> (Option<i32>, String) {
    let mut p = Proc::spawn(name, cmd);
    let st = p.wait_exit(timeout);
    (st.code(), p.output())
}

#[allow(clippy::too_many_arguments)]
fn mesh_rank(
    bin: &Path,
    role: &str,
    rank: u32,
    sched: &str,
    m: u32,
    n: u32,
    mode: &str,
    job: &str,
) -> Proc {
    let mut c = Command::new(bin);
    c.args([
        role,
        &rank.to_string(),
        sched,
        &m.to_string(),
        &n.to_string(),
        mode,
        "12",
    ])
    .env("TEST_JOB", job)
    .env_remove("AFMESH_LOG");
    Proc::spawn(&format!("{role} {rank}"), c)
}

fn run_mesh(bin: &Path, m: u32, n: u32, mode: &str) {
    let sched = free_port();
    let job = format!("c-{mode}-{}", std::process::id());
    let mut ranks = Vec::new();
    for r in 0..m {
        ranks.push(mesh_rank(bin, "attention", r, &sched, m, n, mode, &job));
    }
    for r in 0..n {
        ranks.push(mesh_rank(bin, "ffn", r, &sched, m, n, mode, &job));
    }
    for p in &mut ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert_eq!(st.code(), Some(0), "{}:\n{out}", p.name);
        assert!(out.contains(" ok"), "{}:\n{out}", p.name);
        assert!(
            !out.contains("ERROR: AddressSanitizer"),
            "{}:\n{out}",
            p.name
        );
    }
}

/// The rendezvous server from C under a StepMesh scheduler's environment
/// (`DMLC_ROLE=scheduler`, two nodes of each role): the role is reported,
/// the server listens where `DMLC_PS_ROOT_*` say and serves a 2A+2F mesh
/// of threads to the end (tests/c/test_scheduler.c).
#[test]
fn scheduler_from_a_stepmesh_environment() {
    let bin = compile(
        "cc",
        "c11",
        "tests/c/test_scheduler.c",
        "test_scheduler",
        &["-pthread"],
    );
    let port = free_port();
    let port = port.rsplit(':').next().unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg(port);
    for (k, _) in std::env::vars() {
        if k.starts_with("AFMESH_") || k.starts_with("DMLC_") || k.starts_with("STEPMESH_") {
            cmd.env_remove(k);
        }
    }
    let (code, out) = run_to_end("test_scheduler", cmd, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("scheduler ok"), "{out}");
}

#[test]
fn null_arguments_and_config_errors() {
    let bin = compile("cc", "c11", "tests/c/test_args.c", "test_args", &[]);
    let (code, out) = run_to_end("test_args", Command::new(bin), Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("args ok"), "{out}");
}

#[test]
fn mesh_2a2f_from_c() {
    let bin = compile("cc", "c11", "tests/c/test_mesh.c", "test_mesh", &[]);
    run_mesh(&bin, 2, 2, "run");
}

#[test]
fn mesh_2a2f_caller_buffers_from_c() {
    let bin = compile("cc", "c11", "tests/c/test_mesh.c", "test_mesh_buf", &[]);
    run_mesh(&bin, 2, 2, "buffer");
}

/// The matrix stage layout from C: every byte verified, and each
/// sender's view is its rows of the stage's matrix.
#[test]
fn mesh_2a2f_matrix_layout_from_c() {
    let bin = compile("cc", "c11", "tests/c/test_mesh.c", "test_mesh_matrix", &[]);
    run_mesh(&bin, 2, 2, "matrix");
}

#[test]
fn timeout_then_use_after_finalize() {
    let bin = compile("cc", "c11", "tests/c/test_mesh.c", "test_mesh_to", &[]);
    let sched = free_port();
    let job = format!("c-timeout-{}", std::process::id());
    let mut a = mesh_rank(&bin, "attention", 0, &sched, 1, 1, "timeout", &job);
    let mut f = mesh_rank(&bin, "ffn", 0, &sched, 1, 1, "stall", &job);
    f.wait_line(Duration::from_secs(20), |l| l.contains("stalling"));
    let st = a.wait_exit(Duration::from_secs(20));
    let out = a.output();
    assert_eq!(st.code(), Some(0), "{out}");
    assert!(out.contains("timeout ok"), "{out}");
    f.kill();
}

#[test]
fn killed_peer_is_reported_without_hang() {
    let bin = compile("cc", "c11", "tests/c/test_mesh.c", "test_mesh_kill", &[]);
    let sched = free_port();
    let job = format!("c-kill-{}", std::process::id());
    let mut ranks = Vec::new();
    for r in 0..2 {
        ranks.push(mesh_rank(
            &bin,
            "attention",
            r,
            &sched,
            2,
            2,
            "forever",
            &job,
        ));
    }
    for r in 0..2 {
        ranks.push(mesh_rank(&bin, "ffn", r, &sched, 2, 2, "forever", &job));
    }
    for p in &ranks {
        p.wait_line(Duration::from_secs(20), |l| l.contains("joined"));
    }
    ranks[3].kill(); // SIGKILL F1 mid-layer
    for p in ranks.iter_mut().take(3) {
        let st = p.wait_exit(Duration::from_secs(15));
        let out = p.output();
        // AFMESH_ERR_PEER_LOST is 4, with a message naming the loss.
        assert_eq!(st.code(), Some(4), "{}:\n{out}", p.name);
        assert!(out.contains("peer lost"), "{}:\n{out}", p.name);
    }
    assert!(ranks[0].output().contains("F1"), "{}", ranks[0].output());
}

/// Runs `tests/c/test_threads.c` (busy handle, interrupt and abort of a
/// wait blocked on another thread) and checks its report.
fn run_threads(bin: PathBuf, asan: bool) {
    let mut c = Command::new(bin);
    c.arg(free_port()).env_remove("AFMESH_LOG");
    if asan {
        c.env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0");
    }
    let (code, out) = run_to_end("test_threads", c, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    for step in ["busy ok", "interrupt ok", "abort ok", "threads ok"] {
        assert!(out.contains(step), "{step}:\n{out}");
    }
    assert!(!out.contains("ERROR: AddressSanitizer"), "{out}");
}

#[test]
fn threads_on_one_handle_busy_interrupt_abort() {
    let bin = compile(
        "cc",
        "c11",
        "tests/c/test_threads.c",
        "test_threads",
        &["-pthread"],
    );
    run_threads(bin, false);
}

#[test]
fn address_sanitizer_run_is_clean() {
    let asan = ["-fsanitize=address", "-fno-omit-frame-pointer"];
    let args = compile("cc", "c11", "tests/c/test_args.c", "test_args_asan", &asan);
    let mut c = Command::new(args);
    // Rust's runtime keeps some allocations until exit by design; ASan's
    // error checks (overflow, use after free, bad free) stay on.
    c.env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0");
    let (code, out) = run_to_end("test_args (asan)", c, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("ERROR: AddressSanitizer"), "{out}");
    let threads = compile(
        "cc",
        "c11",
        "tests/c/test_threads.c",
        "test_threads_asan",
        &[asan[0], asan[1], "-pthread"],
    );
    run_threads(threads, true);
    let mesh = compile("cc", "c11", "tests/c/test_mesh.c", "test_mesh_asan", &asan);
    std::env::set_var("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0");
    run_mesh(&mesh, 1, 2, "run");
}

#[test]
fn header_compiles_as_cpp_with_raii_wrappers() {
    let bin = compile(
        "c++",
        "c++17",
        "tests/cpp/raii.cpp",
        "raii",
        &["-pthread", "-Wold-style-cast"],
    );
    let mut c = Command::new(bin);
    c.arg(free_port());
    let (code, out) = run_to_end("raii", c, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("c++ ok"), "{out}");
}

#[test]
fn afmesh_log_reaches_a_c_programs_stderr() {
    let bin = compile("cc", "c11", "tests/c/test_mesh.c", "test_mesh_log", &[]);
    let sched = free_port();
    let job = format!("c-log-{}", std::process::id());
    let mut ranks = Vec::new();
    for (role, log) in [("attention", Some("afmesh=info")), ("ffn", None)] {
        let mut c = Command::new(&bin);
        c.args([role, "0", &sched, "1", "1", "run", "2"])
            .env("TEST_JOB", &job)
            .env_remove("AFMESH_LOG");
        if let Some(log) = log {
            c.env("AFMESH_LOG", log);
        }
        ranks.push(Proc::spawn(role, c));
    }
    for p in &mut ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        assert_eq!(st.code(), Some(0), "{}:\n{}", p.name, p.output());
    }
    // The library's own info line at join, only where AFMESH_LOG asks.
    let (with, without) = (ranks[0].output(), ranks[1].output());
    assert!(
        with.contains("INFO") && with.contains("rank joined"),
        "{with}"
    );
    assert!(!without.contains("rank joined"), "{without}");
}

/// The functions `include/afmesh.h` declares: identifiers starting
/// `afmesh_` and followed by `(`, outside comments.
fn header_functions() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("include/afmesh.h")).unwrap();
    let mut code = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        let end = rest[start..].find("*/").expect("comment is closed");
        rest = &rest[start + end + 2..];
    }
    code.push_str(rest);
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    code.match_indices("afmesh_")
        .filter(|&(i, _)| !code[..i].ends_with(ident))
        .filter_map(|(i, _)| {
            let name: String = code[i..].chars().take_while(|&c| ident(c)).collect();
            code[i + name.len()..].starts_with('(').then_some(name)
        })
        .collect()
}

#[test]
fn only_afmesh_symbols_are_exported() {
    let so = lib_dir().join("libafmesh.so");
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&so)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // nm writes a versioned symbol as `name@@VERSION`.
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|n| n.split('@').next().unwrap_or(n))
        .collect();
    assert!(names.len() > 20, "{text}");
    let stray: Vec<&&str> = names.iter().filter(|n| !n.starts_with("afmesh_")).collect();
    assert!(stray.is_empty(), "exported non-afmesh symbols: {stray:?}");
    // cbindgen cannot see a function a macro writes, or one in a module it
    // does not reach: such a function is exported but missing from the header.
    let exported: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    let declared = header_functions();
    assert_eq!(
        exported.difference(&declared).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "exported but not in include/afmesh.h"
    );
    assert_eq!(
        declared.difference(&exported).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in include/afmesh.h but not exported"
    );
    let dynamic = Command::new("readelf")
        .args(["-d"])
        .arg(&so)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&dynamic.stdout).contains("libafmesh.so.0"),
        "SONAME carries the ABI version"
    );
}

/// Every exported function sits in the `AFMESH_0` version node that
/// `ffi/afmesh.map` defines, not in the unversioned base (rustc's own
/// version script puts them there unless build.rs's `.symver` takes hold).
#[test]
fn every_exported_symbol_is_versioned_afmesh_0() {
    let so = lib_dir().join("libafmesh.so");
    let out = Command::new("readelf")
        .args(["--dyn-syms", "-W"])
        .arg(&so)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // Defined symbols only: an undefined one has section index UND.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().nth(6) != Some("UND"))
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|n| n.starts_with("afmesh_"))
        .collect();
    assert!(ours.len() > 20, "{text}");
    let unversioned: Vec<&&str> = ours.iter().filter(|n| !n.ends_with("@@AFMESH_0")).collect();
    assert!(
        unversioned.is_empty(),
        "exported without the AFMESH_0 node: {unversioned:?}"
    );
    let defs = Command::new("readelf")
        .args(["-V", "-W"])
        .arg(&so)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&defs.stdout).contains("Name: AFMESH_0"),
        "the library defines the AFMESH_0 node"
    );
}
