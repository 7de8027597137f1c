//! The message header and the immediate value.
//!
//! Every message is one write into a slot of the receiver's registered region:
//! a 64-byte [`Header`], then (dispatches only) the side area, a fixed
//! `round_up_64(side_bytes)` bytes whose first `side_len` are the side
//! block, then the token rows at a fixed 64-aligned offset. The write
//! carries an [`Imm`] naming (kind, stage, sequence); the receiver reads the
//! header from the slot that the imm points at and checks that both agree
//! before it counts the arrival ([`accept`](super::accept::accept)). Under
//! [`FLAG_CHECKSUM`] the length word carries a CRC32C of the message instead.

use super::codec::DecodeError;

/// `"AFMH"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"AFMH");
/// Wire format version; a peer with another version is refused.
/// 2: the side block moved in front of the rows (a fixed side area).
pub const VERSION: u8 = 2;
/// Bytes of an encoded [`Header`].
pub const HEADER_LEN: usize = 64;
/// Header flag: the length word carries a CRC32C of the whole message
/// (header with that word zero, then the payload) instead of the length.
pub const FLAG_CHECKSUM: u8 = 0x01;
/// Where the length word (or the checksum) sits in an encoded header.
pub const CHECKSUM_AT: std::ops::Range<usize> = 24..28;
/// Stages are carried in 7 bits of the immediate.
pub const MAX_STAGES: u32 = 128;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Attention → FFN: token rows and side block.
    Dispatch,
    /// FFN → attention: output rows.
    Combine,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Dispatch => "dispatch",
            Kind::Combine => "combine",
        })
    }
}

impl Kind {
    fn to_u8(self) -> u8 {
        match self {
            Kind::Dispatch => 1,
            Kind::Combine => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            1 => Ok(Kind::Dispatch),
            2 => Ok(Kind::Combine),
            _ => Err(DecodeError::new(format!("kind: unknown value {v}"))),
        }
    }
}

/// The header at the start of every message slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Dispatch or combine.
    pub kind: Kind,
    /// Micro-batch stage, `< MAX_STAGES`.
    pub stage: u8,
    /// How many times this stage has been used before (per stage, from 0).
    pub sequence: u32,
    /// Rank of the sender in its role.
    pub sender: u32,
    /// Token rows in the payload.
    pub tokens: u32,
    /// Bytes of one row.
    pub row_bytes: u32,
    /// Bytes of the side block (at the start of the side area, before the
    /// rows).
    pub side_len: u32,
    /// Trace stamp: when the message was posted (sender's clock, ns).
    pub post_ns: u64,
    /// Trace stamp: when the dispatch this answers landed on the FFN (ns).
    pub land_ns: u64,
    /// Trace stamp: when the FFN handed the batch to its caller (ns).
    pub process_ns: u64,
    /// Trace stamp: when the FFN posted its response (ns).
    pub respond_ns: u64,
    /// With [`FLAG_CHECKSUM`]: the message's CRC32C (see
    /// [`checksum`]). It replaces the length word, a strictly stronger
    /// check of the header since it covers every header byte.
    pub checksum: Option<u32>,
}

/// The CRC32C of a message whose encoded header is `header` (its checksum
/// word is taken as zero) and whose payload is read, in order, by `payload`
/// (given the running CRC, returning it extended).
pub fn checksum(
    header: &[u8; HEADER_LEN],
    payload: impl FnOnce(u32) -> Result<u32, String>,
) -> Result<u32, String> {
    let mut h = *header;
    h[CHECKSUM_AT].fill(0);
    payload(crc32c::crc32c(&h))
}

impl Header {
    /// Payload bytes the header describes: rows plus side block (the write
    /// also carries the unused rest of the side area).
    pub fn payload_len(&self) -> Option<usize> {
        (self.tokens as usize)
            .checked_mul(self.row_bytes as usize)?
            .checked_add(self.side_len as usize)
    }

    /// Writes the header into `out` (exactly [`HEADER_LEN`] bytes).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let length = self
            .payload_len()
            .unwrap_or(usize::MAX)
            .min(u32::MAX as usize) as u32;
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.kind.to_u8();
        b[6] = self.stage;
        b[7] = if self.checksum.is_some() {
            FLAG_CHECKSUM
        } else {
            0
        };
        b[8..12].copy_from_slice(&self.sequence.to_le_bytes());
        b[12..16].copy_from_slice(&self.sender.to_le_bytes());
        b[16..20].copy_from_slice(&self.tokens.to_le_bytes());
        b[20..24].copy_from_slice(&self.side_len.to_le_bytes());
        let word = self.checksum.unwrap_or(length);
        b[CHECKSUM_AT].copy_from_slice(&word.to_le_bytes());
        b[28..32].copy_from_slice(&self.row_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.post_ns.to_le_bytes());
        b[40..48].copy_from_slice(&self.land_ns.to_le_bytes());
        b[48..56].copy_from_slice(&self.process_ns.to_le_bytes());
        b[56..64].copy_from_slice(&self.respond_ns.to_le_bytes());
        b
    }

    /// Decodes and checks every field. Any byte string either decodes or
    /// yields an error naming the bad field.
    pub fn decode(bytes: &[u8]) -> Result<Header, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::new(format!(
                "header: {} bytes, need {HEADER_LEN}",
                bytes.len()
            )));
        }
        // Fixed offsets from a fixed-size array: straight-line loads, no
        // per-field bounds checks (this runs once per arrival).
        let b: &[u8; HEADER_LEN] = match bytes[..HEADER_LEN].try_into() {
            Ok(b) => b,
            Err(_) => return Err(DecodeError::new("header: short")),
        };
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(DecodeError::new(format!(
                "magic: {magic:#010x} is not AFMH"
            )));
        }
        let version = b[4];
        if version != VERSION {
            return Err(DecodeError::new(format!(
                "version: {version}, this build speaks {VERSION}"
            )));
        }
        let kind = Kind::from_u8(b[5])?;
        let stage = b[6];
        if u32::from(stage) >= MAX_STAGES {
            return Err(DecodeError::new(format!("stage: {stage} >= {MAX_STAGES}")));
        }
        let flags = b[7];
        if flags & !FLAG_CHECKSUM != 0 {
            return Err(DecodeError::new(format!(
                "flags: unknown bits {flags:#04x}"
            )));
        }
        let sequence = u32_at(8);
        let sender = u32_at(12);
        let tokens = u32_at(16);
        let side_len = u32_at(20);
        let length = u32_at(CHECKSUM_AT.start);
        let row_bytes = u32_at(28);
        let h = Header {
            kind,
            stage,
            sequence,
            sender,
            tokens,
            row_bytes,
            side_len,
            post_ns: u64_at(32),
            land_ns: u64_at(40),
            process_ns: u64_at(48),
            respond_ns: u64_at(56),
            checksum: (flags & FLAG_CHECKSUM != 0).then_some(length),
        };
        if h.checksum.is_some() {
            // Checked against the bytes by whoever reads the payload.
            return match h.payload_len() {
                Some(_) => Ok(h),
                None => Err(DecodeError::new(
                    "length: tokens*row_bytes+side_len overflows",
                )),
            };
        }
        match h.payload_len() {
            Some(n) if n == length as usize => Ok(h),
            other => Err(DecodeError::new(format!(
                "length: header says {length}, tokens*row_bytes+side_len is {other:?}"
            ))),
        }
    }
}

/// The 32-bit immediate that announces a message: kind (1 bit), stage
/// (7 bits), low 24 bits of the sequence. The link it arrives on names the
/// sender, so arrivals can be counted per (stage, sequence) with no ordering
/// assumed between writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Imm {
    /// Dispatch or combine.
    pub kind: Kind,
    /// Stage.
    pub stage: u8,
    /// Low 24 bits of the sequence.
    pub seq24: u32,
}

impl Imm {
    /// The imm for a message.
    pub fn new(kind: Kind, stage: u8, sequence: u32) -> Imm {
        Imm {
            kind,
            stage: stage & 0x7f,
            seq24: sequence & 0x00ff_ffff,
        }
    }
    /// Packs into the wire u32.
    pub fn encode(self) -> u32 {
        let k = match self.kind {
            Kind::Dispatch => 0,
            Kind::Combine => 1u32 << 31,
        };
        k | (u32::from(self.stage & 0x7f) << 24) | (self.seq24 & 0x00ff_ffff)
    }
    /// Unpacks; every u32 is a valid imm.
    pub fn decode(v: u32) -> Imm {
        Imm {
            kind: if v >> 31 == 1 {
                Kind::Combine
            } else {
                Kind::Dispatch
            },
            stage: ((v >> 24) & 0x7f) as u8,
            seq24: v & 0x00ff_ffff,
        }
    }
    /// Whether `h` is the header this imm announces.
    pub fn matches(&self, h: &Header) -> bool {
        self.kind == h.kind && self.stage == h.stage && self.seq24 == h.sequence & 0x00ff_ffff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            kind: Kind::Dispatch,
            stage: 2,
            sequence: 41,
            sender: 3,
            tokens: 128,
            row_bytes: 7168,
            side_len: 512,
            post_ns: 1,
            land_ns: 2,
            process_ns: 3,
            respond_ns: 4,
            checksum: None,
        }
    }

    #[test]
    fn encode_decode_sample() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn rejects_bad_magic_version_length() {
        let mut b = sample().encode();
        b[0] ^= 1;
        assert!(Header::decode(&b).unwrap_err().0.contains("magic"));
        let mut b = sample().encode();
        b[4] = 9;
        assert!(Header::decode(&b).unwrap_err().0.contains("version"));
        let mut b = sample().encode();
        b[24] ^= 1;
        assert!(Header::decode(&b).unwrap_err().0.contains("length"));
        assert!(Header::decode(&b[..10]).unwrap_err().0.contains("header"));
    }

    #[test]
    fn checksum_rides_in_the_length_word_under_its_flag() {
        let mut h = sample();
        h.checksum = Some(0xdead_beef);
        let b = h.encode();
        assert_eq!(b[7], FLAG_CHECKSUM);
        assert_eq!(Header::decode(&b).unwrap(), h);
        // The CRC ignores the word it is stored in, so it can be checked
        // from the encoded header as it arrived.
        let payload = b"rows";
        let crc = |hdr: &[u8; HEADER_LEN]| {
            checksum(hdr, |c| Ok(crc32c::crc32c_append(c, payload))).unwrap()
        };
        let mut other = b;
        other[CHECKSUM_AT].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(crc(&b), crc(&other));
        // Any other header bit changes it.
        let mut flipped = b;
        flipped[40] ^= 1;
        assert_ne!(crc(&b), crc(&flipped));
        // Unknown flags are still refused.
        let mut bad = b;
        bad[7] |= 0x02;
        assert!(Header::decode(&bad).is_err());
    }

    #[test]
    fn imm_round_trip_and_match() {
        let h = sample();
        let imm = Imm::new(h.kind, h.stage, h.sequence);
        assert_eq!(Imm::decode(imm.encode()), imm);
        assert!(imm.matches(&h));
        assert!(!Imm::new(Kind::Combine, 2, 41).matches(&h));
        assert!(!Imm::new(Kind::Dispatch, 2, 42).matches(&h));
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        (
            any::<bool>(),
            0u8..128,
            any::<u32>(),
            any::<u32>(),
            0u32..100_000,
            0u32..100_000,
            0u32..1_000_000,
            any::<[u64; 4]>(),
        )
            .prop_map(
                |(k, stage, sequence, sender, tokens, row_bytes, side, s)| Header {
                    kind: if k { Kind::Dispatch } else { Kind::Combine },
                    stage,
                    sequence,
                    sender,
                    tokens: tokens % 4096,
                    row_bytes: row_bytes % 65_536,
                    side_len: side,
                    post_ns: s[0],
                    land_ns: s[1],
                    process_ns: s[2],
                    respond_ns: s[3],
                    checksum: None,
                },
            )
    }

    proptest! {
        #[test]
        fn header_round_trips(h in arb_header()) {
            prop_assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn any_bytes_decode_or_error(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            // Must return, never panic.
            let _ = Header::decode(&b);
        }

        #[test]
        fn mutated_header_decodes_or_errors(h in arb_header(), i in 0usize..HEADER_LEN, x in 1u8..=255) {
            let mut b = h.encode();
            b[i] ^= x;
            if let Ok(d) = Header::decode(&b) {
                // A mutation that still decodes must re-encode to the same bytes.
                prop_assert_eq!(d.encode(), b);
            }
        }

        #[test]
        fn imm_round_trips(v in any::<u32>()) {
            prop_assert_eq!(Imm::decode(v).encode(), v);
        }
    }
}
