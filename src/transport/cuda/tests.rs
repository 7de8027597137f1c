//! Unit tests of the CUDA backend that run without a GPU: the refusal
//! naming CUDA, a foreign endpoint blob refused by name, and how a write
//! the GPU announces is seen complete from its notice word.

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

/// A GPU-announced write is complete once its entry's sequence word holds
/// the value that publishes it, or a later lap's; before, the word holds
/// the previous lap's value (capacity less) or 0. Across the u32 wrap too.
#[test]
fn a_notice_word_is_published_at_its_value_or_a_later_lap() {
    use std::sync::atomic::{AtomicU32, Ordering};
    const CAP: u32 = 256;
    let word = Box::new(AtomicU32::new(0));
    let at = &*word as *const AtomicU32 as usize;
    for h in [0u32, 1, CAP - 1, CAP, 5 * CAP + 7, u32::MAX - 1, u32::MAX] {
        let value = h.wrapping_add(1);
        let before = if h < CAP { 0 } else { value.wrapping_sub(CAP) };
        word.store(before, Ordering::Release);
        assert!(!writes::published(at, value), "entry {h}: not yet stored");
        word.store(value, Ordering::Release);
        assert!(writes::published(at, value), "entry {h}: stored");
        word.store(value.wrapping_add(CAP), Ordering::Release);
        assert!(
            writes::published(at, value),
            "entry {h}: the slot's next lap"
        );
    }
    // Entry u32::MAX is published by 0 (the wrap), and entry 0 of that lap
    // is unseen until its own value.
    word.store(0, Ordering::Release);
    assert!(writes::published(at, 0));
    assert!(!writes::published(at, 1));
}
