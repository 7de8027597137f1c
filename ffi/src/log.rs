//! `AFMESH_LOG` for C callers: a C program has no Rust `main` to set up a
//! tracing subscriber, so the library sets one up itself, once, when the
//! first handle is made: only if `AFMESH_LOG` is set and the process has
//! no global subscriber yet (a Rust host that linked us keeps its own).

use std::sync::Once;

use tracing_subscriber::EnvFilter;

/// Installs the stderr subscriber if `AFMESH_LOG` asks for one. Cheap
/// after the first call.
pub(crate) fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Some(spec) = std::env::var_os("AFMESH_LOG") else {
            return;
        };
        let filter = EnvFilter::try_new(spec.to_string_lossy())
            .unwrap_or_else(|_| EnvFilter::new("afmesh=info"));
        // Fails only if a global subscriber exists: that one stays.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    });
}
