//! The device answers and the stream wait: rows already on this rank's GPU
//! copied into the send slots (`respond_device`, ordered after a caller's
//! stream with `respond_device_on`), and a batch's wait enqueued on a
//! caller's CUDA stream (`wait_batch_on`).

use super::*;

impl FfnRank {
    /// Answers `batch` with rows already on this rank's GPU: `outputs[a]`
    /// is the device address of attention rank `a`'s `token_count(a) ×
    /// out_row_bytes` bytes. They are copied device to device into the
    /// send slots (copy engine), enqueued on the rank's fill stream as
    /// [`crate::AttentionRank::dispatch_device`] says. Only for a rank whose
    /// stage memory is on a GPU; otherwise as [`FfnRank::respond`].
    pub fn respond_device(&mut self, batch: Batch, outputs: &[u64]) -> Result<(), RespondError> {
        let MemoryKind::Cuda { device } = self.engine.send_kind() else {
            return Err(RespondError {
                batch: Some(batch),
                error: Error::Unsupported(
                    "respond_device: this rank's stage memory is host memory (use respond)".into(),
                ),
            });
        };
        if outputs.len() != batch.senders() {
            let n = batch.senders();
            return Err(RespondError {
                batch: Some(batch),
                error: Error::invalid(format!(
                    "respond_device: {} outputs for {n} attention ranks",
                    outputs.len()
                )),
            });
        }
        for (a, &p) in outputs.iter().enumerate() {
            let len = batch.token_count(a) * self.st.layout.spec.out_row_bytes as usize;
            if len > 0 {
                // Device memory of one allocation, or refused.
                if let Err(error) = crate::cuda::pointer_info(p, len) {
                    return Err(RespondError {
                        batch: Some(batch),
                        error,
                    });
                }
            }
        }
        self.respond_rows(batch, Rows::Device { device, outputs })
    }

    /// Stream-ordered [`FfnRank::respond_device`]: the copies start only
    /// after the work enqueued so far on the caller's CUDA stream `stream`
    /// (e.g. the FFN kernels that wrote `outputs`; 0 is the legacy default
    /// stream), and the host never waits for the GPU. Not to be called
    /// while `stream` is being captured into a CUDA graph.
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or 0), and the
    /// outputs must stay allocated, and unchanged, until the answer's
    /// copies ran.
    pub unsafe fn respond_device_on(
        &mut self,
        batch: Batch,
        outputs: &[u64],
        stream: u64,
    ) -> Result<(), RespondError> {
        let MemoryKind::Cuda { device } = self.engine.send_kind() else {
            return self.respond_device(batch, outputs);
        };
        let fill = self.engine.fill_stream();
        // SAFETY: the caller's contract covers `stream`.
        let ordered = unsafe { crate::cuda::order_after(device, fill, stream) };
        if let Err(error) = ordered {
            return Err(RespondError {
                batch: Some(batch),
                error,
            });
        }
        self.respond_device(batch, outputs)
    }

    /// Enqueues on the caller's CUDA stream `stream` a wait for the next
    /// batch of `stage` (the one [`FfnRank::get_batch`] hands out next for
    /// that stage): work the caller enqueues after this call (the FFN
    /// kernels reading [`Batch::tokens_addr`]'s slots, which stay at one
    /// address per (stage, attention rank)) starts only once every linked
    /// attention rank's data of that batch has landed. The host does not
    /// wait: the wait is `cuStreamWaitValue32` on a flag in host-mapped
    /// memory that the engine raises the moment it counts the stage's last
    /// arrival, which happens inside any call that progresses this rank
    /// (`get_batch`, `try_get_batch`, `progress`), so keep calling one. If
    /// a needed attention rank is lost, the call that reports it lets the
    /// waiting streams go (their kernels then read a partial stage).
    ///
    /// Order: enqueue the wait only after posting everything the attention
    /// ranks need before they can send the batch it is for (this rank's
    /// answers to every earlier batch they wait on). Streams may share a
    /// hardware queue: with `CUDA_DEVICE_MAX_CONNECTIONS=1` (Megatron-style
    /// engines set it) every stream of the process does, with 2 some do,
    /// and a stream parked in this wait then holds up whatever was enqueued
    /// after it on them, this rank's own posted copies included (a warning
    /// is logged on the first wait under such a setting).
    ///
    /// CUDA graphs: the wait may be captured (`cuStreamWaitValue32` is a
    /// stream memory operation), but a replayed graph waits for the
    /// sequence captured; so call it outside capture, once per batch.
    /// `Unsupported` on a host rank or without CUDA.
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or 0), and
    /// this rank must outlive the wait: drop it only after the stream has
    /// passed the wait (e.g. after `cuStreamSynchronize`).
    pub unsafe fn wait_batch_on(&mut self, stage: u32, stream: u64) -> Result<()> {
        let MemoryKind::Cuda { device } = self.memory() else {
            return Err(stream_wait::host_rank("wait_batch_on"));
        };
        let s = stage as usize;
        let Some(next) = self.st.stages.next_batch(s) else {
            return Err(Error::InvalidArgument(format!(
                "wait_batch_on: stage {stage} of {}",
                self.st.layout.stages()
            )));
        };
        if self.st.flags.is_none() {
            let stages = &self.st.stages;
            self.st.flags = Some(StageFlags::new(device, self.st.layout.stages(), |s| {
                stages.complete_through(s).unwrap_or(0)
            })?);
        }
        let Some(f) = &self.st.flags else {
            return Err(Error::Unsupported("wait_batch_on: no stage flags".into()));
        };
        // Stages that completed since the flag was last raised (peers of
        // none) are raised here; then the stream waits for `next`.
        if let Some(q) = self.st.stages.complete_through(s) {
            f.raise(s, q);
        }
        // SAFETY: the caller's contract.
        unsafe { f.enqueue(s, stream, next.wrapping_add(1)) }
    }
}
