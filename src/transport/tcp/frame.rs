//! The tcp frame header: what a one-sided write looks like on a stream.

use crate::proto::codec::{DecodeError, Reader};

/// `"AFMT"` as a little-endian u32.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"AFMT");
/// Bytes of an encoded frame header.
pub const FRAME_LEN: usize = 32;
const FLAG_IMM: u32 = 1;
const FLAG_CLOSE: u32 = 2;

/// A write: `len` payload bytes follow, to land in `region` at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Target region id at the receiver.
    pub region: u32,
    /// Offset in the region.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
    /// The immediate, if the write carries one.
    pub imm: Option<u32>,
    /// The sender is closing the link in order; nothing follows.
    pub close: bool,
}

impl FrameHeader {
    /// Encodes to [`FRAME_LEN`] bytes.
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let mut b = [0u8; FRAME_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        let flags =
            if self.imm.is_some() { FLAG_IMM } else { 0 } | if self.close { FLAG_CLOSE } else { 0 };
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.region.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.imm.unwrap_or(0).to_le_bytes());
        b
    }

    /// Decodes and checks magic, flags and padding.
    pub fn decode(b: &[u8; FRAME_LEN]) -> Result<FrameHeader, DecodeError> {
        let mut r = Reader::new(b);
        let magic = r.u32("frame magic")?;
        if magic != FRAME_MAGIC {
            return Err(DecodeError(format!(
                "frame magic {magic:#010x} is not AFMT"
            )));
        }
        let flags = r.u32("frame flags")?;
        if flags & !(FLAG_IMM | FLAG_CLOSE) != 0 {
            return Err(DecodeError(format!("frame flags: unknown bits {flags:#x}")));
        }
        let region = r.u32("frame region")?;
        let len = r.u32("frame len")?;
        let offset = r.u64("frame offset")?;
        let imm = r.u32("frame imm")?;
        let pad = r.u32("frame pad")?;
        if pad != 0 {
            return Err(DecodeError(format!("frame padding {pad:#x} is not zero")));
        }
        Ok(FrameHeader {
            region,
            offset,
            len,
            imm: (flags & FLAG_IMM != 0).then_some(imm),
            close: flags & FLAG_CLOSE != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(region in any::<u32>(), offset in any::<u64>(), len in any::<u32>(), imm in proptest::option::of(any::<u32>()), close in any::<bool>()) {
            let h = FrameHeader { region, offset, len, imm, close };
            prop_assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn garbage_decodes_or_errors(b in any::<[u8; FRAME_LEN]>()) {
            let _ = FrameHeader::decode(&b);
        }
    }
}
