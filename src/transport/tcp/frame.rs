//! The tcp frame header: what a one-sided write looks like on a stream.
//!
//! A frame header is `"AFMT"`, the write's [`Notice`], and four zero bytes
//! of padding; `len` payload bytes follow unless the notice closes the
//! link.

use crate::proto::codec::DecodeError;
use crate::transport::notice::{Notice, NOTICE_LEN};

/// `"AFMT"` as a little-endian u32.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"AFMT");
/// Bytes of an encoded frame header.
pub const FRAME_LEN: usize = 32;
const NOTICE_END: usize = 4 + NOTICE_LEN;

/// Encodes the header of a frame carrying `n`.
pub fn encode(n: &Notice) -> [u8; FRAME_LEN] {
    let mut b = [0u8; FRAME_LEN];
    b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    b[4..NOTICE_END].copy_from_slice(&n.encode());
    b
}

/// Decodes a frame header, checking magic, notice and padding.
pub fn decode(b: &[u8; FRAME_LEN]) -> Result<Notice, DecodeError> {
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if magic != FRAME_MAGIC {
        return Err(DecodeError(format!(
            "frame magic {magic:#010x} is not AFMT"
        )));
    }
    let pad = &b[NOTICE_END..];
    if pad.iter().any(|&x| x != 0) {
        return Err(DecodeError(format!("frame padding {pad:02x?} is not zero")));
    }
    let mut n = [0u8; NOTICE_LEN];
    n.copy_from_slice(&b[4..NOTICE_END]);
    Notice::decode(&n).map_err(|e| DecodeError(format!("frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::notice::tests::any_notice;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(n in any_notice()) {
            prop_assert_eq!(decode(&encode(&n)), Ok(n));
        }

        /// Any bytes decode or error; what decodes has exactly these bytes
        /// as its encoding.
        #[test]
        fn garbage_decodes_canonically_or_errors(b in any::<[u8; FRAME_LEN]>()) {
            if let Ok(n) = decode(&b) {
                prop_assert_eq!(encode(&n), b);
            }
        }

        /// Bytes that start with the magic and end with zero padding get
        /// through to the notice check, so the property above also covers
        /// the notice decoder rather than only the magic check.
        #[test]
        fn framed_garbage_is_judged_by_the_notice(n in any::<[u8; NOTICE_LEN]>()) {
            let mut b = [0u8; FRAME_LEN];
            b[0..4].copy_from_slice(b"AFMT");
            b[4..NOTICE_END].copy_from_slice(&n);
            prop_assert_eq!(decode(&b).is_ok(), Notice::decode(&n).is_ok());
        }
    }

    /// The layout the frame had before the notice codec was shared.
    #[test]
    fn wire_layout_is_unchanged() {
        let b = encode(&Notice {
            region: 0x0302_0100,
            offset: 0x0f0e_0d0c_0b0a_0908,
            len: 0x0706_0504,
            imm: Some(0x1312_1110),
            close: false,
        });
        let mut want = [0u8; FRAME_LEN];
        want[0..4].copy_from_slice(b"AFMT");
        want[4] = 1; // flags: imm
        want[8..12].copy_from_slice(&[0, 1, 2, 3]);
        want[12..16].copy_from_slice(&[4, 5, 6, 7]);
        want[16..24].copy_from_slice(&[8, 9, 10, 11, 12, 13, 14, 15]);
        want[24..28].copy_from_slice(&[0x10, 0x11, 0x12, 0x13]);
        assert_eq!(b, want);
    }
}
