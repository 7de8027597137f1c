//! Waits for a stage enqueued on a CUDA stream (issue 10 item 4): one
//! 32-bit flag per stage in pinned, device-mapped host memory, which the
//! engine raises to "batches (or combines) complete through sequence q"
//! the moment it counts the last arrival of a stage, and on which a
//! caller's stream waits with `cuStreamWaitValue32` (`>=`, wrapping). The
//! host never blocks for the GPU, and the GPU's kernels start as soon as
//! the engine, progressed by any call on the rank (`get_batch`,
//! `try_get_batch`, `progress`, `wait_combine`, ...), has seen the stage
//! land: kernel launches overlap the wait.

use crate::cuda::{self, Device, HostFlag};
use crate::error::{Error, Result};

/// One flag per stage, made on the first stream wait of a rank.
#[derive(Debug)]
pub(crate) struct StageFlags {
    device: i32,
    flags: Vec<HostFlag>,
}

impl StageFlags {
    /// Flags for `stages` stages on `device`, each at `through(stage)`.
    pub(crate) fn new(
        device: i32,
        stages: usize,
        through: impl Fn(usize) -> u32,
    ) -> Result<StageFlags> {
        let dev = Device::get(device)?;
        if one_connection(std::env::var("CUDA_DEVICE_MAX_CONNECTIONS").ok().as_deref()) {
            tracing::warn!(
                "CUDA_DEVICE_MAX_CONNECTIONS=1: every stream of this process shares one hardware queue, so a stream parked in a stage wait (wait_batch_on / wait_combine_on) holds up all work enqueued after it on any stream, this rank's own posted copies included; post what the peers need (earlier stages' combines or dispatches) before enqueuing a wait, or raise the setting"
            );
        }
        let mut flags = Vec::with_capacity(stages);
        for s in 0..stages {
            let f = HostFlag::new(&dev)?;
            f.set(through(s));
            flags.push(f);
        }
        Ok(StageFlags { device, flags })
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
        // SAFETY: the caller's contract; the flag lives in `self`.
        unsafe { cuda::wait_value_geq(stream as cuda::CuStream, f.device_addr(), through) }
    }
}

/// The error for a stream wait on a rank whose stages are host memory.
pub(crate) fn host_rank(call: &str) -> Error {
    Error::Unsupported(format!(
        "{call}: this rank's stage memory is host memory; stream waits are for device ranks (CUDA)"
    ))
}

/// Whether `CUDA_DEVICE_MAX_CONNECTIONS` (its value, if set) puts every
/// stream of the process on one hardware queue.
fn one_connection(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim().parse::<u32>() == Ok(1))
}

#[cfg(test)]
mod tests {
    use super::one_connection;

    #[test]
    fn one_connection_is_only_the_value_1() {
        assert!(one_connection(Some("1")));
        assert!(one_connection(Some(" 1 ")));
        for v in [None, Some(""), Some("0"), Some("2"), Some("8"), Some("x")] {
            assert!(!one_connection(v), "{v:?}");
        }
    }
}
