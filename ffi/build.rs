//! Gives libafmesh.so its SONAME (carrying the ABI version) and exports
//! only the `afmesh_` symbols.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let abi = "0";
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libafmesh.so.{abi}");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/afmesh.map");
    }
    println!("cargo:rerun-if-changed=afmesh.map");
    println!("cargo:rerun-if-changed=build.rs");
}
