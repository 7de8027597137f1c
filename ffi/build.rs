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

use std::path::Path;

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let abi = "0";
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libafmesh.so.{abi}");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/afmesh.map");
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
