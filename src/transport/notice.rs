//! The write notice: what a one-sided write tells its receiver, in one
//! fixed 24-byte encoding shared by the backends that carry notices
//! themselves (a tcp frame is `"AFMT"`, a notice and padding; a shm ring
//! slot is a notice and its sequence word).
//!
//! Decoding is checked: unknown flag bits, or an imm value without the imm
//! flag, are errors, so every notice has exactly one encoding and a peer's
//! garbage is reported rather than half-understood.

use crate::proto::codec::DecodeError;

/// Bytes of an encoded notice.
pub const NOTICE_LEN: usize = 24;

const FLAG_IMM: u32 = 1;
const FLAG_CLOSE: u32 = 2;

/// A write: `len` bytes landed (or, on tcp, follow) for region `region`
/// at `offset`.
///
/// Layout, little-endian: flags (u32), region (u32), len (u32), offset
/// (u64), imm (u32). It is the layout the tcp frame had before the codec
/// was shared, so the tcp wire format did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notice {
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

fn u32_at(b: &[u8; NOTICE_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Notice {
    /// The notice that closes a link in order.
    pub const CLOSE: Notice = Notice {
        region: 0,
        offset: 0,
        len: 0,
        imm: None,
        close: true,
    };

    /// Encodes to [`NOTICE_LEN`] bytes.
    #[inline]
    pub fn encode(&self) -> [u8; NOTICE_LEN] {
        let flags =
            if self.imm.is_some() { FLAG_IMM } else { 0 } | if self.close { FLAG_CLOSE } else { 0 };
        let mut b = [0u8; NOTICE_LEN];
        b[0..4].copy_from_slice(&flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.region.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..20].copy_from_slice(&self.offset.to_le_bytes());
        b[20..24].copy_from_slice(&self.imm.unwrap_or(0).to_le_bytes());
        b
    }

    /// Decodes, refusing unknown flag bits and an imm value without the
    /// imm flag.
    #[inline]
    pub fn decode(b: &[u8; NOTICE_LEN]) -> Result<Notice, DecodeError> {
        let flags = u32_at(b, 0);
        if flags & !(FLAG_IMM | FLAG_CLOSE) != 0 {
            return Err(DecodeError::new(format!(
                "notice flags: unknown bits {flags:#x}"
            )));
        }
        let imm = u32_at(b, 20);
        if flags & FLAG_IMM == 0 && imm != 0 {
            return Err(DecodeError::new(format!(
                "notice imm {imm:#x} without the imm flag"
            )));
        }
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&b[12..20]);
        Ok(Notice {
            region: u32_at(b, 4),
            offset: u64::from_le_bytes(offset),
            len: u32_at(b, 8),
            imm: (flags & FLAG_IMM != 0).then_some(imm),
            close: flags & FLAG_CLOSE != 0,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any notice.
    pub(crate) fn any_notice() -> impl Strategy<Value = Notice> {
        (
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
        )
            .prop_map(|(region, offset, len, imm, close)| Notice {
                region,
                offset,
                len,
                imm,
                close,
            })
    }

    proptest! {
        #[test]
        fn round_trip(n in any_notice()) {
            prop_assert_eq!(Notice::decode(&n.encode()), Ok(n));
        }

        /// Any bytes decode or error; what decodes has exactly these bytes
        /// as its encoding.
        #[test]
        fn garbage_decodes_canonically_or_errors(b in any::<[u8; NOTICE_LEN]>()) {
            if let Ok(n) = Notice::decode(&b) {
                prop_assert_eq!(n.encode(), b);
            }
        }
    }

    #[test]
    fn unknown_flags_and_stray_imm_are_errors() {
        let mut b = Notice::default().encode();
        b[0] = 4;
        assert!(Notice::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown bits 0x4"));
        let mut b = Notice::default().encode();
        b[20] = 1;
        assert!(Notice::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("without the imm flag"));
    }

    #[test]
    fn close_is_flag_two_and_nothing_else() {
        let mut want = [0u8; NOTICE_LEN];
        want[0] = 2;
        assert_eq!(Notice::CLOSE.encode(), want);
    }
}
