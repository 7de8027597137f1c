//! Finding a shared library the workspace builds, for tests that load it
//! into C programs. `cargo test` does not build cdylibs, `cargo build`
//! does; a missing or stale one fails with that hint rather than testing
//! old code.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::SystemTime;

fn newest(dir: &Path) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let m = if p.is_dir() {
            newest(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).unwrap_or(t)
        };
        t = t.max(m);
    }
    t
}

/// The sources cargo recorded for `so` in its dep-info file (`libx.d`
/// beside it), if there is one: only those can make it stale (a binary's
/// or a test's source does not).
fn recorded_sources(so: &Path) -> Option<Vec<PathBuf>> {
    let text = std::fs::read_to_string(so.with_extension("d")).ok()?;
    let (_, deps) = text.lines().next()?.split_once(": ")?;
    Some(deps.split_whitespace().map(PathBuf::from).collect())
}

/// `file` (e.g. `libafmesh.so`) in this test binary's profile directory,
/// checked to be at least as new as every source cargo built it from (its
/// dep-info), else every file under `sources`.
pub fn built(file: &str, sources: &[PathBuf]) -> PathBuf {
    // target/<profile>/deps/<test>-<hash> -> target/<profile>
    let exe = std::env::current_exe().expect("test binary path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let so = profile.join(file);
    let hint = "build it first: `cargo build --workspace` (cargo test does not build cdylibs)";
    let when = std::fs::metadata(&so)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} not found; {hint}", so.display()));
    let newest = match recorded_sources(&so) {
        // A source that is gone counts as newer: rebuild.
        Some(files) => files
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .and_then(|m| m.modified())
                    .unwrap_or_else(|_| SystemTime::now())
            })
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH),
        None => sources
            .iter()
            .map(|d| newest(d))
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH),
    };
    assert!(
        when >= newest,
        "{} is older than its sources; {hint}",
        so.display()
    );
    so
}
