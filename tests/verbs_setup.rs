//! How verbs is picked up on softverbs: the binary and the C library do not
//! link libibverbs, `auto` prefers verbs when a port is active, and
//! `AFMESH_VERBS_LIB` loads the library it names.

#![allow(clippy::unwrap_used)]

#[path = "common/cdylib.rs"]
mod cdylib;
mod common;
#[path = "common/verbs_mesh.rs"]
mod verbs_mesh;

use std::path::PathBuf;
use std::time::Duration;

use common::{afmesh, rank_command, scheduler, Proc};
use verbs_mesh::*;

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
    let _fabric = FabricFile::new("auto");
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
