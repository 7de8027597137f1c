//! Device answers built in place: the caller's kernels write each
//! attention rank's answer rows straight into the registered reply slot,
//! and the respond posts the slots with no copy of the rows.

use super::*;

impl FfnRank {
    /// The device address of the reply rows to attention rank `a` for
    /// `batch`: `token_count(a) × out_row_bytes` bytes of this rank's
    /// registered device send slot, into which the caller writes its
    /// answer (the FFN kernel's output) before
    /// [`FfnRank::respond_device_in_place`]. The slot's previous answer is
    /// waited out first (bounded by the send timeout); write the rows from
    /// the return of this call until the respond, not after.
    /// `Unsupported` on a host rank.
    pub fn reply_slot_device(&mut self, batch: &Batch, a: usize) -> Result<u64> {
        if self.engine.send_kind() == MemoryKind::Host {
            return Err(Error::Unsupported(
                "reply_slot_device: this rank's stage memory is host memory (use respond_with)"
                    .into(),
            ));
        }
        self.check_batch(batch)?;
        let m = self.st.layout.m;
        if a >= m {
            return Err(Error::invalid(format!(
                "reply_slot_device: attention rank {a} of {m}"
            )));
        }
        let slot = batch.stage as usize * m + a;
        self.engine.reclaim(slot, &mut self.st)?;
        let rows = batch.token_count(a) * self.st.layout.spec.out_row_bytes as usize;
        self.engine.slot_addr(slot, HEADER_LEN, rows)
    }

    /// Answers `batch` with the rows already in its reply slots (written
    /// through [`FfnRank::reply_slot_device`]): each slot is posted as it
    /// is, with no fill copy. The posted copies start after the work
    /// enqueued so far on the legacy default stream; rows written from
    /// another stream need [`FfnRank::respond_device_in_place_on`].
    pub fn respond_device_in_place(&mut self, batch: Batch) -> Result<(), RespondError> {
        if self.engine.send_kind() == MemoryKind::Host {
            return Err(RespondError {
                batch: Some(batch),
                error: Error::Unsupported(
                    "respond_device_in_place: this rank's stage memory is host memory (use respond_with)"
                        .into(),
                ),
            });
        }
        self.respond_rows(batch, Rows::InPlace)
    }

    /// Stream-ordered [`FfnRank::respond_device_in_place`]: the posted
    /// copies start only after the work enqueued so far on the caller's
    /// CUDA stream `stream` (e.g. the FFN kernels that wrote the reply
    /// slots; 0 is the legacy default stream), and the host never waits.
    /// Not to be called while `stream` is being captured into a CUDA graph.
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or 0).
    pub unsafe fn respond_device_in_place_on(
        &mut self,
        batch: Batch,
        stream: u64,
    ) -> Result<(), RespondError> {
        let MemoryKind::Cuda { device } = self.engine.send_kind() else {
            return self.respond_device_in_place(batch);
        };
        let fill = self.engine.fill_stream();
        // SAFETY: the caller's contract covers `stream`.
        if let Err(error) = unsafe { crate::cuda::order_after(device, fill, stream) } {
            return Err(RespondError {
                batch: Some(batch),
                error,
            });
        }
        self.respond_device_in_place(batch)
    }
}
