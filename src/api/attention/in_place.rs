//! Device rows built in place: the caller's kernels write a stage's rows
//! straight into its registered send slot, and the dispatch posts the slot
//! with no copy of the rows at all (`dispatch_device` copies them in
//! first, a copy within the GPU that costs the host ≈ 6 µs of driver time).

use super::*;

impl AttentionRank {
    /// The device address of stage `stage`'s send rows: `max_tokens ×
    /// row_bytes` bytes of this rank's registered device send slot, into
    /// which the caller writes (a kernel's output, a copy) the rows of the
    /// stage's next [`AttentionRank::dispatch_device_in_place`]. The slot
    /// keeps its bytes between dispatches of the stage.
    ///
    /// Checked like a dispatch: the stage exists and is idle (its last
    /// combine taken) and no FFN rank is lost; the slot's previous message
    /// is waited out (bounded by the send timeout), so the rows may be
    /// written from the return of this call until the next dispatch of
    /// the stage, and not after. `Unsupported` on a host rank.
    pub fn send_slot_device(&mut self, stage: u32) -> Result<u64> {
        if self.engine.send_kind() == MemoryKind::Host {
            return Err(Error::Unsupported(
                "send_slot_device: this rank's stage memory is host memory (use dispatch_with)"
                    .into(),
            ));
        }
        let s = self.begin(stage, 0)?;
        let layout = self.st.layout;
        let len = layout.spec.max_tokens as usize * layout.spec.row_bytes as usize;
        self.engine.slot_addr(s, layout.rows_at(), len)
    }

    /// Sends the first `tokens` rows already in stage `stage`'s send slot
    /// (written through [`AttentionRank::send_slot_device`]) and the host
    /// `side` block to every FFN rank: the slot is posted as it is, with
    /// no fill copy. The posted copies start after the work enqueued so
    /// far on the legacy default stream (the rank's fill stream, which
    /// orders them, is a blocking stream); rows written from another
    /// stream need [`AttentionRank::dispatch_device_in_place_on`]. Checked
    /// like [`AttentionRank::dispatch_device`].
    pub fn dispatch_device_in_place(
        &mut self,
        stage: u32,
        tokens: usize,
        side: &[u8],
    ) -> Result<DispatchHandle> {
        if self.engine.send_kind() == MemoryKind::Host {
            return Err(Error::Unsupported(
                "dispatch_device_in_place: this rank's stage memory is host memory (use dispatch_with)"
                    .into(),
            ));
        }
        let spec = self.st.layout.spec;
        if side.len() > spec.side_bytes as usize {
            return Err(Error::BufferSize {
                what: "dispatch side block exceeds side_bytes".into(),
                need: side.len(),
                got: spec.side_bytes as usize,
            });
        }
        self.begin(stage, tokens)?;
        self.finish(stage, tokens, Side::Copy(side))
    }

    /// Stream-ordered [`AttentionRank::dispatch_device_in_place`]: the
    /// posted copies start only after the work enqueued so far on the
    /// caller's CUDA stream `stream` (e.g. the kernel that wrote the rows
    /// into the slot; 0 is the legacy default stream): an event recorded
    /// there orders the rank's fill stream, which orders the copies. The
    /// host never waits. Not to be called while `stream` is being captured
    /// into a CUDA graph.
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or 0).
    pub unsafe fn dispatch_device_in_place_on(
        &mut self,
        stage: u32,
        tokens: usize,
        side: &[u8],
        stream: u64,
    ) -> Result<DispatchHandle> {
        let MemoryKind::Cuda { device } = self.engine.send_kind() else {
            return self.dispatch_device_in_place(stage, tokens, side);
        };
        // SAFETY: the caller's contract covers `stream`.
        unsafe { crate::cuda::order_after(device, self.engine.fill_stream(), stream) }?;
        self.dispatch_device_in_place(stage, tokens, side)
    }
}
