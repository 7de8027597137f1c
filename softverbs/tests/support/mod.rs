//! What the softverbs test programs share: the built provider, a fabric
//! namespace per test, the child-process helper and a free TCP port.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

#[path = "../../../tests/common/proc.rs"]
pub mod proc;

#[path = "../../../tests/common/cdylib.rs"]
mod cdylib;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The built provider.
pub fn provider() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        cdylib::built(
            "libsoftverbs.so",
            &[here.join("src"), here.join("../sys/src")],
        )
    })
}

/// A namespace for one test, removed when dropped.
pub struct Ns(pub String);

impl Ns {
    pub fn new(tag: &str) -> Ns {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ns(format!("t-{tag}-{}-{n}", std::process::id()))
    }

    /// `program` under the provider, in this namespace, with none of the
    /// caller's softverbs settings.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("LD_PRELOAD", provider())
            .env("SOFTVERBS_NAMESPACE", &self.0)
            .env_remove("SOFTVERBS_DEVICES")
            .env_remove("SOFTVERBS_LINK_LAYER")
            .env_remove("SOFTVERBS_FAULT")
            .env_remove("SOFTVERBS_FAIL_WR");
        c
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let prefix = format!("softverbs.{}.", self.0);
        for e in std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A TCP port free on loopback right now.
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}
