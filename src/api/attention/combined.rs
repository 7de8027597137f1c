//! A completed combine: the N partials viewed in place, their sum, their trace stamps.

use super::*;

/// The combined result of one dispatch: N partial blocks, viewed in place
/// in the registered output slots.
#[derive(Debug)]
pub struct Combined<'a> {
    pub(super) rank: &'a AttentionRank,
    pub(super) stage: usize,
    pub(super) tokens: usize,
}

impl<'a> Combined<'a> {
    /// Rows in each partial.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Number of partials (FFN ranks).
    pub fn len(&self) -> usize {
        self.rank.st.layout.n
    }
    /// Whether there are no partials (never, in a valid mesh).
    pub fn is_empty(&self) -> bool {
        self.rank.st.layout.n == 0
    }
    /// FFN rank `f`'s rows (`tokens × out_row_bytes`), zero-copy.
    pub fn partial(&self, f: usize) -> Option<&'a [u8]> {
        let layout = &self.rank.st.layout;
        if f >= layout.n {
            return None;
        }
        let off = layout.out_offset(self.stage, f) + HEADER_LEN;
        let len = self.tokens * layout.spec.out_row_bytes as usize;
        self.rank.engine.recv_region().slice(off, len).ok()
    }
    /// FFN rank `f`'s rows as an address (a device address when the
    /// rank's stage memory is on a GPU, where [`Combined::partial`] is
    /// `None`), valid while this value lives.
    pub fn partial_addr(&self, f: usize) -> Option<u64> {
        let layout = &self.rank.st.layout;
        if f >= layout.n {
            return None;
        }
        let off = layout.out_offset(self.stage, f) + HEADER_LEN;
        let len = self.tokens * layout.spec.out_row_bytes as usize;
        self.rank.engine.recv_region().addr_of(off, len).ok()
    }
    /// Copies FFN rank `f`'s rows into `out` (host memory; from the GPU
    /// when the stage memory is there); returns their length.
    pub fn copy_partial(&self, f: usize, out: &mut [u8]) -> Result<usize> {
        let layout = &self.rank.st.layout;
        if f >= layout.n {
            return Err(Error::invalid(format!(
                "partial {f}: only {} FFN ranks",
                layout.n
            )));
        }
        let off = layout.out_offset(self.stage, f) + HEADER_LEN;
        let len = self.tokens * layout.spec.out_row_bytes as usize;
        let Some(out) = out.get_mut(..len) else {
            return Err(Error::BufferSize {
                what: format!("copy of partial {f}"),
                need: len,
                got: out.len(),
            });
        };
        self.rank
            .engine
            .recv_region()
            .copy_out(off, out)
            .map_err(Error::invalid)?;
        Ok(len)
    }
    /// All partials, in FFN-rank order.
    pub fn partials(&self) -> Vec<&'a [u8]> {
        (0..self.len()).filter_map(|f| self.partial(f)).collect()
    }
    /// Writes the element-wise sum of the partials into `out`.
    pub fn sum_into(&self, dtype: Dtype, out: &mut [u8]) -> Result<()> {
        let kind = self.rank.engine.recv_region().kind();
        if kind != MemoryKind::Host {
            return Err(Error::Unsupported(format!(
                "the sum of partials in {kind} is not computed on the host: use partial_addr"
            )));
        }
        sum_into(dtype, &self.partials(), out)
    }
    /// Trace stamps of FFN rank `f`'s combine.
    pub fn trace(&self, f: usize) -> Option<Trace> {
        let st = &self.rank.st;
        if f >= st.layout.n {
            return None;
        }
        st.traces.get(self.stage * st.layout.n + f).copied()
    }
}
