//! Taking a combine: waiting for (or polling) every FFN rank's answer to a
//! dispatch, summing the partials into a caller's buffer, and the checks of
//! a handle and a sum's output.

use super::*;

impl AttentionRank {
    /// Waits up to `timeout` for every FFN rank's combine of `handle`, and
    /// returns the partials. The stage is free for the next dispatch once
    /// the returned value is dropped.
    pub fn wait_combine(
        &mut self,
        handle: DispatchHandle,
        timeout: Duration,
    ) -> Result<Combined<'_>> {
        self.wait_all(&[handle], timeout)?;
        let s = handle.stage as usize;
        let tokens = self.st.stages.tokens(s).unwrap_or(0) as usize;
        self.st.stages.finish(s);
        Ok(Combined {
            rank: self,
            stage: s,
            tokens,
        })
    }

    /// Waits for the combine of `handle` and writes the element-wise sum of
    /// the N partials into the first `tokens × out_row_bytes` bytes of
    /// `out`; returns that length. `out` is checked first: if it is too
    /// short (`BufferSize`), or `dtype` does not divide `out_row_bytes`
    /// (`InvalidArgument`), nothing is consumed and the combine can still
    /// be taken.
    pub fn wait_combine_sum(
        &mut self,
        handle: DispatchHandle,
        dtype: Dtype,
        out: &mut [u8],
        timeout: Duration,
    ) -> Result<usize> {
        self.st.check(handle)?;
        let need = self.st.sum_len(handle, dtype, out.len())?;
        self.out_apart(out)?;
        let c = self.wait_combine(handle, timeout)?;
        c.sum_into(dtype, &mut out[..need])?;
        Ok(need)
    }

    /// Non-blocking: the combine of `handle` if it is complete.
    pub fn try_combine(&mut self, handle: DispatchHandle) -> Result<Option<Combined<'_>>> {
        self.progress()?;
        self.st.check(handle)?;
        let s = handle.stage as usize;
        if self.st.stages.is_combined(s) {
            return self.wait_combine(handle, Duration::ZERO).map(Some);
        }
        if let Some(f) = self.engine.first_lost(self.st.stages.waiting_on(s)) {
            // The combine can never complete: free the stage.
            self.st.abandon(s);
            return Err(self.engine.lost_error(f));
        }
        Ok(None)
    }

    /// Non-blocking [`AttentionRank::wait_combine_sum`]: if the combine of
    /// `handle` is complete, writes the sum into `out` and returns its
    /// length; `None` if it is not complete yet (nothing is consumed then).
    /// `out` and `dtype` are checked as `wait_combine_sum` checks them,
    /// whether or not the combine is complete.
    pub fn try_combine_sum(
        &mut self,
        handle: DispatchHandle,
        dtype: Dtype,
        out: &mut [u8],
    ) -> Result<Option<usize>> {
        self.st.check(handle)?;
        self.st.sum_len(handle, dtype, out.len())?;
        self.out_apart(out)?;
        self.progress()?;
        let s = handle.stage as usize;
        if self.st.stages.is_combined(s) {
            return self
                .wait_combine_sum(handle, dtype, out, Duration::ZERO)
                .map(Some);
        }
        if let Some(f) = self.engine.first_lost(self.st.stages.waiting_on(s)) {
            // The combine can never complete: free the stage.
            self.st.abandon(s);
            return Err(self.engine.lost_error(f));
        }
        Ok(None)
    }

    /// Waits up to `timeout` until every handle's combine is complete,
    /// without taking them (take them with `wait_combine`, which then
    /// returns at once).
    pub fn wait_all(&mut self, handles: &[DispatchHandle], timeout: Duration) -> Result<()> {
        let mut waiting = None;
        let done = self.engine.wait(&mut self.st, timeout, |engine, st| {
            waiting = None;
            for h in handles {
                st.check(*h)?;
                let s = h.stage as usize;
                if st.stages.is_combined(s) {
                    continue;
                }
                if let Some(f) = engine.first_lost(st.stages.waiting_on(s)) {
                    // The combine can never complete: free the stage.
                    st.abandon(s);
                    return Err(engine.lost_error(f));
                }
                waiting.get_or_insert(s);
            }
            Ok(waiting.is_none().then_some(()))
        })?;
        match (done, waiting) {
            (Some(()), _) | (None, None) => Ok(()),
            (None, Some(s)) => Err(Error::Timeout {
                op: "combine",
                peer: self.engine.names(self.st.stages.missing(s)),
                after: timeout,
            }),
        }
    }
}

impl State {
    /// The bytes a sum of `handle`'s combine fills, once `dtype` and an
    /// output of `got` bytes are checked against them.
    fn sum_len(&self, handle: DispatchHandle, dtype: Dtype, got: usize) -> Result<usize> {
        let out_row = self.layout.spec.out_row_bytes as usize;
        if !out_row.is_multiple_of(dtype.size()) {
            return Err(Error::invalid(format!(
                "combine sum: rows of {out_row} bytes are not whole {} elements",
                dtype.name()
            )));
        }
        let tokens = self.stages.tokens(handle.stage as usize).unwrap_or(0) as usize;
        let need = tokens * out_row;
        if got < need {
            return Err(Error::BufferSize {
                what: format!("combine sum output for {tokens} tokens"),
                need,
                got,
            });
        }
        Ok(need)
    }
}
