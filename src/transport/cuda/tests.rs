//! Unit tests of the CUDA backend that run without a GPU: the refusal
//! naming CUDA, and a foreign endpoint blob refused by name.

use super::*;

#[test]
fn without_cuda_the_backend_is_unsupported_naming_cuda() {
    if cuda::available() {
        return;
    }
    match CudaTransport::create("t", "h", 1) {
        Err(Error::Unsupported(m)) => assert!(m.contains("CUDA"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn a_foreign_blob_is_refused_by_name() {
    assert!(decode(b"junk").is_err());
    let mut w = blob::writer("afmesh-shm-3");
    w.str("x");
    match decode(&w.finish()) {
        Err(e) => assert!(e.contains(MAGIC), "{e}"),
        Ok(_) => panic!("a shm blob decoded as a cuda one"),
    }
}
