//! Gives libafmesh.so its SONAME (carrying the ABI version), exports only
//! the `afmesh_` symbols, and puts each in the `AFMESH_0` version node.
//!
//! The node cannot come from `afmesh.map` alone: rustc passes the linker
//! its own anonymous version script naming every exported symbol, and
//! rust-lld (rustc's default linker on x86_64 Linux) lets those exact
//! names win over the map's `afmesh_*` (GNU ld refuses the two scripts
//! together). So each function also gets a `.symver name, name@@@AFMESH_0`
//! directive, generated here from the `extern "C" fn afmesh_` items in
//! `src/` into `$OUT_DIR/symver.s` and assembled by `lib.rs`. The directive
//! only binds in the object that defines the symbol, hence
//! `codegen-units = 1` for this package in the workspace profiles;
//! `ffi/tests/c_abi.rs` checks every exported symbol carries the node.
//! `@@@` renames the definition, so libafmesh.a links as before.
//!
//! It also leaves `libafmesh.so.0 -> libafmesh.so` in the profile
//! directory (`target/release`), so that after a plain `cargo build
//! --release` a program linked with `-L target/release -lafmesh` (which
//! records the SONAME, `libafmesh.so.0`) runs with
//! `LD_LIBRARY_PATH=target/release`. Cargo has no post-link step and puts
//! build-script output in `OUT_DIR`, but the link is relative and may
//! dangle: made before the library is linked, it resolves once cargo
//! writes `libafmesh.so` beside it. The profile directory is found from
//! cargo's layout, `<profile>/build/afmesh-ffi-<hash>/out`, checked (a
//! `deps` directory beside `build`); where it does not hold (e.g. a
//! `build.build-dir` apart from the target directory) the script says so
//! in a warning and makes nothing, and `make` (the root Makefile) makes
//! the link instead.

use std::path::Path;

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let abi = "0";
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libafmesh.so.{abi}");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/afmesh.map");
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        soname_link(abi);
    }
    let mut asm = String::new();
    let src = Path::new(&dir).join("src");
    let mut files: Vec<_> = std::fs::read_dir(&src)
        .expect("ffi/src")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read ffi source");
        for line in text.lines() {
            let Some(at) = line.find("extern \"C\" fn afmesh_") else {
                continue;
            };
            let rest = &line[at + "extern \"C\" fn ".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            asm.push_str(&format!(".symver {name}, {name}@@@AFMESH_{abi}\n"));
        }
    }
    let out = std::env::var("OUT_DIR").expect("OUT_DIR");
    std::fs::write(Path::new(&out).join("symver.s"), asm).expect("write symver.s");
    println!("cargo:rerun-if-changed=afmesh.map");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src");
}

/// `libafmesh.so.{abi} -> libafmesh.so` in the profile directory (see the
/// module docs). Never fails the build: a warning says what went wrong.
fn soname_link(abi: &str) {
    let Ok(out) = std::env::var("OUT_DIR") else {
        return;
    };
    let out = Path::new(&out);
    let profile = out
        .parent()
        .and_then(Path::parent)
        .filter(|b| b.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .filter(|p| p.join("deps").is_dir());
    let Some(profile) = profile else {
        println!(
            "cargo:warning=libafmesh.so.{abi} not linked: OUT_DIR {} is not in cargo's <profile>/build/<pkg>/out layout; run `make` at the repository root to create it",
            out.display()
        );
        return;
    };
    let link = profile.join(format!("libafmesh.so.{abi}"));
    let target = Path::new("libafmesh.so");
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            if std::fs::read_link(&link).is_ok_and(|t| t == target) {
                return;
            }
            let _ = std::fs::remove_file(&link);
        }
        Ok(_) => {
            println!(
                "cargo:warning={} exists and is not a link: left as it is",
                link.display()
            );
            return;
        }
        Err(_) => {}
    }
    #[cfg(unix)]
    if let Err(e) = std::os::unix::fs::symlink(target, &link) {
        println!(
            "cargo:warning=could not link {} -> libafmesh.so: {e}",
            link.display()
        );
    }
}
