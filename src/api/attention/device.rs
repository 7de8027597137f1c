//! The device dispatches and the stream wait: rows already on this rank's
//! GPU copied into a stage's send slot (`dispatch_device`, ordered after a
//! caller's stream with `dispatch_device_on`), and a combine's wait
//! enqueued on a caller's CUDA stream (`wait_combine_on`).

use super::*;

impl AttentionRank {
    /// Sends `tokens` rows that are already on this rank's GPU, at device
    /// address `rows` (`tokens × row_bytes` bytes, e.g. a tensor's
    /// `data_ptr()`), and the host `side` block, to every FFN rank for
    /// `stage`. The rows are copied device to device into the stage's send
    /// slot (copy engine, no host staging); the copy is enqueued on the
    /// rank's fill stream, a blocking CUDA stream, and this returns without
    /// waiting for it: work the caller enqueues afterwards on the legacy
    /// default stream runs after it and may overwrite `rows`; from any
    /// other stream, wait for the default stream first (or produce `rows`
    /// there and use [`AttentionRank::dispatch_device_on`]). Only for a rank whose stage memory is on a GPU
    /// ([`AttentionRank::memory`]); checked like
    /// [`AttentionRank::dispatch`].
    pub fn dispatch_device(
        &mut self,
        stage: u32,
        rows: u64,
        tokens: usize,
        side: &[u8],
    ) -> Result<DispatchHandle> {
        let MemoryKind::Cuda { device } = self.engine.send_kind() else {
            return Err(Error::Unsupported(
                "dispatch_device: this rank's stage memory is host memory (use dispatch)".into(),
            ));
        };
        let spec = self.st.layout.spec;
        if side.len() > spec.side_bytes as usize {
            return Err(Error::BufferSize {
                what: "dispatch side block exceeds side_bytes".into(),
                need: side.len(),
                got: spec.side_bytes as usize,
            });
        }
        let len = tokens.saturating_mul(spec.row_bytes as usize);
        if len > 0 {
            // Device memory of one allocation, or refused (never host
            // memory through the unified address space).
            crate::cuda::pointer_info(rows, len)?;
        }
        let s = self.begin(stage, tokens)?;
        let rows_at = self.st.layout.rows_at();
        let dst = self.engine.slot_addr(s, rows_at, len)?;
        // SAFETY: `dst` is `len` bytes of this rank's device send slot
        // (bounds checked by `slot_addr`, not posted); the caller gives
        // `len` bytes of device memory at `rows` (the driver refuses an
        // address it does not know) and orders its reuse (method docs).
        unsafe { crate::cuda::copy_enqueued(device, dst, rows, len, self.engine.fill_stream()) }?;
        self.finish(stage, tokens, Side::Copy(side))
    }

    /// Stream-ordered [`AttentionRank::dispatch_device`]: the copies start
    /// only after the work enqueued so far on the caller's CUDA stream
    /// `stream` (a `CUstream`/`cudaStream_t` of this rank's device, e.g. the
    /// one whose kernel produced `rows`; 0 is the legacy default stream),
    /// and the host never waits for the GPU. Not to be called while
    /// `stream` is being captured into a CUDA graph (module docs of
    /// [`crate::cuda`]).
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or 0), and
    /// `rows` must stay allocated, and unchanged, until the dispatch's
    /// copies ran (work ordered after it on the default stream or any
    /// blocking stream of the device sees them done).
    pub unsafe fn dispatch_device_on(
        &mut self,
        stage: u32,
        rows: u64,
        tokens: usize,
        side: &[u8],
        stream: u64,
    ) -> Result<DispatchHandle> {
        let MemoryKind::Cuda { device } = self.engine.send_kind() else {
            return Err(Error::Unsupported(
                "dispatch_device_on: this rank's stage memory is host memory (use dispatch)".into(),
            ));
        };
        // SAFETY: the caller's contract covers `stream`.
        unsafe { crate::cuda::order_after(device, self.engine.fill_stream(), stream) }?;
        self.dispatch_device(stage, rows, tokens, side)
    }

    /// Enqueues on the caller's CUDA stream `stream` a wait for every FFN
    /// rank's combine of `handle`: work enqueued after this call (kernels
    /// reading [`Combined::partial_addr`]'s slots, one address per (stage,
    /// FFN rank)) starts only once all partials have landed. The host does
    /// not wait: `cuStreamWaitValue32` on a host-mapped flag the engine
    /// raises when it counts the last combine, inside any call that
    /// progresses this rank (`wait_combine`, `try_combine`, `dispatch`,
    /// `progress`), so keep calling one and still take the combine
    /// (`wait_combine` / `try_combine`) to free the stage. A combine that
    /// can never complete (a lost FFN rank) lets the stream go when the
    /// host sees the loss.
    ///
    /// Order: enqueue the wait only after posting everything the FFN ranks
    /// need before they can answer `handle` (its dispatch and every
    /// earlier one they wait on). Streams may share a hardware queue: with
    /// `CUDA_DEVICE_MAX_CONNECTIONS=1` (Megatron-style engines set it)
    /// every stream of the process does, with 2 some do, and a stream
    /// parked in this wait then holds up whatever was enqueued after it on
    /// them, this rank's own posted copies included (a warning is logged
    /// on the first wait under such a setting).
    ///
    /// CUDA graphs: the wait can be captured, but a replayed graph waits
    /// for the sequence captured; call it outside capture, per dispatch.
    /// `Unsupported` on a host rank or without CUDA.
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or 0), and
    /// this rank must outlive the wait (drop it only after the stream has
    /// passed it).
    pub unsafe fn wait_combine_on(&mut self, handle: DispatchHandle, stream: u64) -> Result<()> {
        let MemoryKind::Cuda { device } = self.memory() else {
            return Err(stream_wait::host_rank("wait_combine_on"));
        };
        self.st.check(handle)?;
        let s = handle.stage as usize;
        if self.st.flags.is_none() {
            let stages = &self.st.stages;
            self.st.flags = Some(StageFlags::new(device, self.st.layout.stages(), |s| {
                stages.combined_through(s).unwrap_or(0)
            })?);
        }
        let Some(f) = &self.st.flags else {
            return Err(Error::Unsupported("wait_combine_on: no stage flags".into()));
        };
        if let Some(q) = self.st.stages.combined_through(s) {
            f.raise(s, q);
        }
        // SAFETY: the caller's contract.
        unsafe { f.enqueue(s, stream, handle.seq.wrapping_add(1)) }
    }
}
