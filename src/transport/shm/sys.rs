//! The operating-system calls the shared-memory transport needs: shared
//! mappings, process-shared futexes, watching a peer process, pinning.
//! They live in the `afmesh-sys` crate, which softverbs shares; this
//! module keeps their path in afmesh.

pub use afmesh_sys::*;
