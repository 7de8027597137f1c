//! Blocking calls: the GIL is released, and the wait runs in slices so
//! that Ctrl-C (any pending signal handler) ends it within a slice.

use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::errors::{invalid, to_py};

/// Longest stretch between two looks at pending signals: Ctrl-C ends a
/// wait within this plus one park (5 ms).
pub const SLICE: Duration = Duration::from_millis(20);

/// Seconds (Python's unit) as a Duration; refuses negative and NaN.
pub fn seconds(s: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| {
        invalid(format!(
            "{what}={s}: expected a non-negative number of seconds"
        ))
    })
}

/// Runs `step(slice)` with the GIL released until it returns something
/// other than a timeout or `timeout` has passed; between slices, pending
/// signals run (KeyboardInterrupt propagates). A timeout at the end is
/// reported for the whole wait.
pub fn blocking<T: Send>(
    py: Python<'_>,
    timeout: Duration,
    mut step: impl FnMut(Duration) -> afmesh::Result<T> + Send,
) -> PyResult<T> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let slice = left.min(SLICE);
        match py.detach(|| step(slice)) {
            Err(afmesh::Error::Timeout { .. }) if start.elapsed() < timeout => {
                py.check_signals()?;
            }
            Err(afmesh::Error::Timeout { op, peer, .. }) => {
                return Err(to_py(afmesh::Error::Timeout {
                    op,
                    peer,
                    after: timeout,
                }))
            }
            r => return r.map_err(to_py),
        }
    }
}
