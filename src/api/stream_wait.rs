//! Waits for a stage enqueued on a CUDA stream (issue 10 item 4): one
//! 32-bit flag per stage in pinned, device-mapped host memory, which the
//! engine raises to "batches (or combines) complete through sequence q"
//! the moment it counts the last arrival of a stage, and on which a
//! caller's stream waits with `cuStreamWaitValue32` (`>=`, wrapping). The
//! host never blocks for the GPU, and the GPU's kernels start as soon as
//! the engine, progressed by any call on the rank (`get_batch`,
//! `try_get_batch`, `progress`, `wait_combine`, ...), has seen the stage
//! land: kernel launches overlap the wait.

use std::cell::Cell;

use crate::cuda::{self, Device, HostFlag};
use crate::error::{Error, Result};

/// One flag per stage, made on the first stream wait of a rank.
///
/// Dropped (with its rank) while a stream may still wait on a flag, it
/// raises every flag to the last value a wait was enqueued for, so no
/// stream stays parked, and leaks those flags' pinned pages rather than
/// free memory a GPU may still read. The calls' contract asks the caller
/// not to drop the rank before its streams passed their waits; this is
/// what an error path that does so gets, instead of a GPU reading freed
/// memory or a stream that never moves.
#[derive(Debug)]
pub(crate) struct StageFlags {
    device: i32,
    flags: Vec<HostFlag>,
    /// Per stage, the last value a wait was enqueued for.
    waited: Vec<Cell<Option<u32>>>,
}

impl StageFlags {
    /// Flags for `stages` stages on `device`, each at `through(stage)`.
    pub(crate) fn new(
        device: i32,
        stages: usize,
        through: impl Fn(usize) -> u32,
    ) -> Result<StageFlags> {
        let dev = Device::get(device)?;
        if cuda::few_hardware_queues() {
            tracing::warn!(
                "CUDA_DEVICE_MAX_CONNECTIONS gives this process at most 2 hardware queues: a stream parked in a stage wait (wait_batch_on / wait_combine_on) holds up work enqueued after it on every stream that shares its queue (with 1, every stream), this rank's own posted copies included; post what the peers need before enqueuing a wait (see the calls' docs), or raise the setting"
            );
        }
        let mut flags = Vec::with_capacity(stages);
        for s in 0..stages {
            let f = HostFlag::new(&dev)?;
            f.set(through(s));
            flags.push(f);
        }
        Ok(StageFlags {
            device,
            waited: (0..flags.len()).map(|_| Cell::new(None)).collect(),
            flags,
        })
    }

    /// Every batch (combine) of `stage` with a sequence below `through`
    /// is complete.
    pub(crate) fn raise(&self, stage: usize, through: u32) {
        if let Some(f) = self.flags.get(stage) {
            f.set(through);
        }
    }

    /// Makes `stream`'s later work wait until `stage` is complete through
    /// `through`.
    ///
    /// # Safety
    /// `stream` is a live stream of this rank's device (or 0), and the
    /// flags outlive the wait (the rank is not dropped before the stream
    /// passed it).
    pub(crate) unsafe fn enqueue(&self, stage: usize, stream: u64, through: u32) -> Result<()> {
        let f = self
            .flags
            .get(stage)
            .ok_or_else(|| Error::InvalidArgument(format!("stream wait: no stage {stage}")))?;
        Device::get(self.device)?.bind()?;
        // Noted before the wait is enqueued: a failed enqueue only makes
        // the drop raise a flag no stream waits on.
        if let Some(w) = self.waited.get(stage) {
            w.set(Some(through));
        }
        // SAFETY: the caller's contract; the flag lives in `self` (and is
        // never freed while a wait on it may be pending: `Drop`).
        unsafe { cuda::wait_value_geq(stream as cuda::CuStream, f.device_addr(), through) }
    }
}

impl Drop for StageFlags {
    fn drop(&mut self) {
        for (f, w) in self.flags.drain(..).zip(&self.waited) {
            match w.get() {
                Some(through) => {
                    // A stream may still wait for `through`: let it go, and
                    // keep the page mapped for good (it cannot be known
                    // when the GPU has read the word).
                    f.set(through);
                    std::mem::forget(f);
                }
                None => drop(f),
            }
        }
    }
}

/// The error for a stream wait on a rank whose stages are host memory.
pub(crate) fn host_rank(call: &str) -> Error {
    Error::Unsupported(format!(
        "{call}: this rank's stage memory is host memory; stream waits are for device ranks (CUDA)"
    ))
}
