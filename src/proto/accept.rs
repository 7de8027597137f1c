//! Accepting an arrival: the one place that decides whether a message
//! announced by an imm is counted.
//!
//! An arrival is an imm on the link of peer `from`. [`accept`] checks the
//! imm (a kind this rank receives, a registered stage), reads the header
//! from the slot the imm names, and cross-checks the two: kind, stage,
//! sequence, sender (the link's peer), row bytes, tokens at most
//! `max_tokens`, side block within the side area (none on a combine). Only
//! then does the stage machine count it, which rejects a stale, duplicate or
//! ahead sequence. Whatever is rejected leaves the stage machine unchanged.
//!
//! Pure: the caller supplies the header bytes through a closure (called at
//! most once, and only for a registered stage) and acts on the result.

use super::bootstrap::{Geometry, StageLayout};
use super::codec::DecodeError;
use super::header::{Header, Imm, Kind, HEADER_LEN};
use super::stage::{Field, Reject, StageCounter};

/// An arrival that was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The stage it counts for.
    pub stage: usize,
    /// The header it carried.
    pub header: Header,
    /// Whether it completed the stage (every peer has arrived).
    pub complete: bool,
}

/// What a message of `kind` may carry under `g`: (row bytes, most side
/// bytes).
fn limits(kind: Kind, g: &Geometry) -> (u32, u32) {
    match kind {
        Kind::Dispatch => (g.row_bytes, g.side_bytes),
        Kind::Combine => (g.out_row_bytes, 0),
    }
}

fn mismatch(field: Field, header: impl Into<u64>, expected: impl Into<u64>) -> Reject {
    Reject::Mismatch {
        field,
        header: header.into(),
        expected: expected.into(),
    }
}

/// Decides whether the message `imm` announces on peer `from`'s link is
/// counted by `stages`; see the module docs for the checks and their order.
/// `read_header(stage)` returns the header bytes of `from`'s slot for
/// `stage` (copied out of the region), or why it could not.
pub fn accept<C: StageCounter>(
    geometry: &Geometry,
    from: usize,
    imm: Imm,
    landed: u64,
    read_header: impl FnOnce(usize) -> Result<[u8; HEADER_LEN], String>,
    stages: &mut C,
) -> Result<Accepted, Reject> {
    accept_checked(
        geometry,
        StageLayout::Slots,
        from,
        imm,
        landed,
        read_header,
        |_, _, _| Ok(()),
        stages,
    )
}

/// [`accept`], with one more check last before the stage machine counts
/// the message: `check(header, header bytes, message length)` (the
/// payload's checksum, where the rank asks for them) fails it with
/// [`Reject::Checksum`]. Under `layout` [`StageLayout::Matrix`] a
/// dispatch's announced write is its header and side area only (the rows
/// went before it on the same ordered link), so `landed` is checked
/// against that ([`arrival_len`]).
#[allow(clippy::too_many_arguments)]
pub fn accept_checked<C: StageCounter>(
    geometry: &Geometry,
    layout: StageLayout,
    from: usize,
    imm: Imm,
    landed: u64,
    read_header: impl FnOnce(usize) -> Result<[u8; HEADER_LEN], String>,
    check: impl FnOnce(&Header, &[u8; HEADER_LEN], u64) -> Result<(), String>,
    stages: &mut C,
) -> Result<Accepted, Reject> {
    if imm.kind != C::KIND {
        return Err(Reject::WrongKind { got: imm.kind });
    }
    if u32::from(imm.stage) >= geometry.stages {
        return Err(Reject::NoSuchStage);
    }
    let stage = usize::from(imm.stage);
    let raw = read_header(stage).map_err(|e| Reject::BadHeader(DecodeError(e)))?;
    let h = Header::decode(&raw).map_err(Reject::BadHeader)?;
    if h.kind != C::KIND {
        return Err(Reject::WrongKind { got: h.kind });
    }
    if h.stage != imm.stage {
        return Err(mismatch(Field::Stage, h.stage, imm.stage));
    }
    if h.sequence & 0x00ff_ffff != imm.seq24 {
        return Err(mismatch(
            Field::Sequence,
            h.sequence & 0x00ff_ffff,
            imm.seq24,
        ));
    }
    if h.sender as usize != from {
        return Err(mismatch(Field::Sender, h.sender, from as u64));
    }
    let (row_bytes, max_side) = limits(C::KIND, geometry);
    if h.row_bytes != row_bytes {
        return Err(mismatch(Field::RowBytes, h.row_bytes, row_bytes));
    }
    if h.tokens > geometry.max_tokens {
        return Err(Reject::TooLarge {
            field: Field::Tokens,
            header: h.tokens.into(),
            max: geometry.max_tokens.into(),
        });
    }
    if h.side_len > max_side {
        return Err(Reject::TooLarge {
            field: Field::SideLen,
            header: h.side_len.into(),
            max: max_side.into(),
        });
    }
    let need = arrival_len(C::KIND, geometry, layout, h.tokens);
    if landed < need {
        return Err(Reject::Short { landed, need });
    }
    // The payload is read only for a message the stage machine would
    // count: a stale or duplicate one's slot may hold the next message.
    stages.admits(stage, from, h.sequence, h.tokens)?;
    check(&h, &raw, need).map_err(Reject::Checksum)?;
    let complete = stages.count(stage, from, h.sequence, h.tokens)?;
    Ok(Accepted {
        stage,
        header: h,
        complete,
    })
}

/// Bytes of a message of `tokens` rows: the header, the side area (a
/// dispatch's side block rounded up to 64 bytes, so rows stay aligned), the
/// rows.
pub fn message_len(kind: Kind, g: &Geometry, tokens: u32) -> u64 {
    let h = HEADER_LEN as u64;
    match kind {
        Kind::Dispatch => {
            h + u64::from(g.side_bytes).div_ceil(64) * 64
                + u64::from(tokens) * u64::from(g.row_bytes)
        }
        Kind::Combine => h + u64::from(tokens) * u64::from(g.out_row_bytes),
    }
}

/// Bytes the write that announces a message of `tokens` rows carries:
/// the whole message ([`message_len`]), except a dispatch under the matrix
/// layout, whose announced write is the header and the side area.
pub fn arrival_len(kind: Kind, g: &Geometry, layout: StageLayout, tokens: u32) -> u64 {
    match (kind, layout) {
        (Kind::Dispatch, StageLayout::Matrix) => {
            HEADER_LEN as u64 + u64::from(g.side_bytes).div_ceil(64) * 64
        }
        _ => message_len(kind, g, tokens),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::proto::{AttentionStages, FfnStages};
    use proptest::prelude::*;

    const G: Geometry = Geometry {
        stages: 3,
        max_tokens: 8,
        row_bytes: 32,
        out_row_bytes: 16,
        side_bytes: 24,
    };

    fn dispatch(stage: u8, seq: u32, from: u32, tokens: u32, side: u32) -> Header {
        Header {
            kind: Kind::Dispatch,
            stage,
            sequence: seq,
            sender: from,
            tokens,
            row_bytes: G.row_bytes,
            side_len: side,
            post_ns: 1,
            land_ns: 0,
            process_ns: 0,
            respond_ns: 0,
            checksum: None,
        }
    }

    fn combine(stage: u8, seq: u32, from: u32, tokens: u32) -> Header {
        Header {
            kind: Kind::Combine,
            row_bytes: G.out_row_bytes,
            side_len: 0,
            ..dispatch(stage, seq, from, tokens, 0)
        }
    }

    fn imm_of(h: &Header) -> Imm {
        Imm::new(h.kind, h.stage, h.sequence)
    }

    /// Accepts `h` announced by its own imm on `from`'s link.
    fn offer<C: StageCounter>(c: &mut C, from: usize, h: &Header) -> Result<Accepted, Reject> {
        let bytes = h.encode();
        accept(&G, from, imm_of(h), u64::MAX, |_| Ok(bytes), c)
    }

    #[test]
    fn counts_a_valid_dispatch_once() {
        let mut f = FfnStages::new(3, 2);
        let h = dispatch(1, 0, 0, 8, 24);
        let a = offer(&mut f, 0, &h).unwrap();
        assert_eq!((a.stage, a.header, a.complete), (1, h, false));
        assert_eq!(offer(&mut f, 0, &h), Err(Reject::Duplicate));
        let a = offer(&mut f, 1, &dispatch(1, 0, 1, 0, 0)).unwrap();
        assert!(a.complete);
    }

    #[test]
    fn counts_a_valid_combine() {
        let mut a = AttentionStages::new(3, 1);
        a.dispatch(2, 5).unwrap();
        let got = offer(&mut a, 0, &combine(2, 0, 0, 5)).unwrap();
        assert!(got.complete);
        assert_eq!(
            offer(&mut a, 0, &combine(2, 0, 0, 5)),
            Err(Reject::Duplicate)
        );
    }

    #[test]
    fn each_check_has_its_reject() {
        let mut f = FfnStages::new(3, 2);
        let ok = dispatch(0, 0, 1, 2, 3);
        let cases: Vec<(Imm, Header, usize, Reject)> = vec![
            (
                Imm::new(Kind::Combine, 0, 0),
                ok,
                1,
                Reject::WrongKind { got: Kind::Combine },
            ),
            (Imm::new(Kind::Dispatch, 3, 0), ok, 1, Reject::NoSuchStage),
            (
                imm_of(&ok),
                Header {
                    kind: Kind::Combine,
                    ..ok
                },
                1,
                Reject::WrongKind { got: Kind::Combine },
            ),
            (
                Imm::new(Kind::Dispatch, 0, 0),
                Header { stage: 2, ..ok },
                1,
                mismatch(Field::Stage, 2u8, 0u8),
            ),
            (
                imm_of(&ok),
                Header { sequence: 7, ..ok },
                1,
                mismatch(Field::Sequence, 7u32, 0u32),
            ),
            (imm_of(&ok), ok, 0, mismatch(Field::Sender, 1u32, 0u64)),
            (
                imm_of(&ok),
                Header {
                    row_bytes: 31,
                    ..ok
                },
                1,
                mismatch(Field::RowBytes, 31u32, 32u32),
            ),
            (
                imm_of(&ok),
                Header { tokens: 9, ..ok },
                1,
                Reject::TooLarge {
                    field: Field::Tokens,
                    header: 9,
                    max: 8,
                },
            ),
            (
                imm_of(&ok),
                Header { side_len: 25, ..ok },
                1,
                Reject::TooLarge {
                    field: Field::SideLen,
                    header: 25,
                    max: 24,
                },
            ),
        ];
        for (imm, h, from, want) in cases {
            let bytes = h.encode();
            assert_eq!(
                accept(&G, from, imm, u64::MAX, |_| Ok(bytes), &mut f),
                Err(want.clone()),
                "{want}"
            );
        }
        // A combine may carry no side block at all.
        let mut a = AttentionStages::new(3, 1);
        a.dispatch(0, 1).unwrap();
        let h = Header {
            side_len: 1,
            ..combine(0, 0, 0, 1)
        };
        assert!(matches!(
            offer(&mut a, 0, &h),
            Err(Reject::TooLarge {
                field: Field::SideLen,
                max: 0,
                ..
            })
        ));
        // Nothing above was counted.
        assert_eq!(f, FfnStages::new(3, 2));
        assert!(offer(&mut f, 1, &ok).is_ok());
    }

    #[test]
    fn a_write_shorter_than_its_message_is_rejected() {
        let mut f = FfnStages::new(3, 1);
        let h = Header {
            kind: Kind::Dispatch,
            stage: 1,
            sequence: 0,
            sender: 0,
            tokens: 3,
            row_bytes: G.row_bytes,
            side_len: 0,
            post_ns: 0,
            land_ns: 0,
            process_ns: 0,
            respond_ns: 0,
            checksum: None,
        };
        let need = message_len(Kind::Dispatch, &G, 3);
        assert_eq!(need, 64 + G.side_bytes.div_ceil(64) as u64 * 64 + 3 * 32);
        let bytes = h.encode();
        let r = accept(&G, 0, imm_of(&h), need - 1, |_| Ok(bytes), &mut f);
        assert_eq!(
            r,
            Err(Reject::Short {
                landed: need - 1,
                need
            })
        );
        assert!(accept(&G, 0, imm_of(&h), need, |_| Ok(bytes), &mut f).is_ok());
    }

    #[test]
    fn header_is_read_only_for_a_registered_stage_and_bad_bytes_are_rejected() {
        let mut f = FfnStages::new(3, 1);
        let mut read = false;
        let r = accept(
            &G,
            0,
            Imm::new(Kind::Dispatch, 5, 0),
            u64::MAX,
            |_| {
                read = true;
                Ok([0; HEADER_LEN])
            },
            &mut f,
        );
        assert_eq!(r, Err(Reject::NoSuchStage));
        assert!(!read);
        let r = accept(
            &G,
            0,
            Imm::new(Kind::Dispatch, 1, 0),
            u64::MAX,
            |s| {
                assert_eq!(s, 1);
                Ok([0xee; HEADER_LEN])
            },
            &mut f,
        );
        assert!(matches!(r, Err(Reject::BadHeader(e)) if e.0.contains("magic")));
        let r = accept(
            &G,
            0,
            Imm::new(Kind::Dispatch, 1, 0),
            u64::MAX,
            |_| Err("slot outside the region".into()),
            &mut f,
        );
        assert!(matches!(r, Err(Reject::BadHeader(e)) if e.0.contains("outside")));
    }

    #[test]
    fn stage_machine_rejects_stale_and_ahead() {
        let mut f = FfnStages::new(1, 1);
        offer(&mut f, 0, &dispatch(0, 0, 0, 1, 0)).unwrap();
        f.hand_out(0).unwrap();
        assert!(f.respond(0, 0));
        assert_eq!(
            offer(&mut f, 0, &dispatch(0, 0, 0, 1, 0)),
            Err(Reject::Stale)
        );
        assert_eq!(
            offer(&mut f, 0, &dispatch(0, 2, 0, 1, 0)),
            Err(Reject::Ahead)
        );
        assert!(offer(&mut f, 0, &dispatch(0, 1, 0, 1, 0)).is_ok());
    }

    fn arb_dispatch() -> impl Strategy<Value = (Header, usize)> {
        (0u8..3, 0usize..2, 0u32..=8, 0u32..=24, any::<u64>()).prop_map(
            |(stage, from, tokens, side, post)| {
                let h = Header {
                    post_ns: post,
                    ..dispatch(stage, 0, from as u32, tokens, side)
                };
                (h, from)
            },
        )
    }

    proptest! {
        /// Any imm and any header bytes: accept returns, and what it
        /// rejects leaves the stage machine as it was.
        #[test]
        fn anything_is_accepted_or_rejected_without_effect(
            imm in any::<u32>(),
            bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN),
            from in 0usize..4,
        ) {
            let mut f = FfnStages::new(3, 2);
            let before = f.clone();
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&bytes);
            match accept(&G, from, Imm::decode(imm), u64::MAX, |_| Ok(h), &mut f) {
                Ok(a) => prop_assert_eq!(a.header.sender as usize, from),
                Err(_) => prop_assert_eq!(f, before),
            }
        }

        /// A genuine dispatch is counted exactly once; replaying it is a
        /// duplicate.
        #[test]
        fn genuine_dispatch_counts_once((h, from) in arb_dispatch()) {
            let mut f = FfnStages::new(3, 2);
            let a = offer(&mut f, from, &h);
            prop_assert_eq!(a, Ok(Accepted { stage: h.stage as usize, header: h, complete: false }));
            prop_assert_eq!(offer(&mut f, from, &h), Err(Reject::Duplicate));
        }

        /// Changing any checked field of a genuine dispatch (so that the
        /// header still decodes) gets it rejected, uncounted, as a broken
        /// peer rather than a replay; the genuine one is still accepted.
        #[test]
        fn a_changed_field_is_rejected((h, from) in arb_dispatch(), which in 0usize..7, by in 1u32..1000) {
            let bad = match which {
                0 => Header { kind: Kind::Combine, ..h },
                1 => Header { stage: ((u32::from(h.stage) + by % 127 + 1) % 128) as u8, ..h },
                2 => Header { sequence: h.sequence.wrapping_add(by), ..h },
                3 => Header { sender: h.sender.wrapping_add(by), ..h },
                4 => Header { row_bytes: h.row_bytes.wrapping_add(by), ..h },
                5 => Header { tokens: G.max_tokens + by, ..h },
                _ => Header { side_len: G.side_bytes + by, ..h },
            };
            let mut f = FfnStages::new(3, 2);
            let bytes = bad.encode();
            let r = accept(&G, from, imm_of(&h), u64::MAX, |_| Ok(bytes), &mut f);
            prop_assert!(r.is_err(), "accepted {:?}", r);
            prop_assert!(!r.unwrap_err().is_replay());
            prop_assert_eq!(&f, &FfnStages::new(3, 2));
            prop_assert!(offer(&mut f, from, &h).is_ok());
        }
    }

    #[test]
    fn a_matrix_dispatch_is_announced_by_its_head_alone() {
        // The rows went first on the same ordered link: the announced
        // write is the header and the side area, whatever the tokens.
        let head = (HEADER_LEN as u64) + u64::from(G.side_bytes).div_ceil(64) * 64;
        for t in [0, 1, G.max_tokens] {
            assert_eq!(
                arrival_len(Kind::Dispatch, &G, StageLayout::Matrix, t),
                head
            );
            assert_eq!(
                arrival_len(Kind::Dispatch, &G, StageLayout::Slots, t),
                message_len(Kind::Dispatch, &G, t)
            );
            assert_eq!(
                arrival_len(Kind::Combine, &G, StageLayout::Matrix, t),
                message_len(Kind::Combine, &G, t)
            );
        }
        let mut f = FfnStages::new(3, 2);
        let h = dispatch(0, 0, 0, 8, 24);
        let bytes = h.encode();
        let r = accept_checked(
            &G,
            StageLayout::Matrix,
            0,
            imm_of(&h),
            head - 1,
            |_| Ok(bytes),
            |_, _, _| Ok(()),
            &mut f,
        );
        assert!(matches!(r, Err(Reject::Short { .. })), "{r:?}");
        let r = accept_checked(
            &G,
            StageLayout::Matrix,
            0,
            imm_of(&h),
            head,
            |_| Ok(bytes),
            |_, _, _| Ok(()),
            &mut f,
        );
        assert!(r.is_ok(), "{r:?}");
    }
}
