//! The committed `include/afmesh.h` is exactly what cbindgen makes of
//! `ffi/src/lib.rs` and the modules it declares (cbindgen follows `mod`):
//! a changed ABI cannot land without its header.
//! `AFMESH_BLESS=1` rewrites the header instead of comparing.

use std::path::Path;

#[test]
fn header_matches_the_source() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut fresh);
    let path = dir.join("../include/afmesh.h");
    if std::env::var_os("AFMESH_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write header");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/afmesh.h is stale: regenerate it with `AFMESH_BLESS=1 cargo test -p afmesh-ffi --test header` and commit it"
    );
}
