//! Unit tests of the bootstrap messages: round trips and refusals.

use super::*;
use proptest::prelude::*;

fn decode_frame(b: &[u8]) -> Result<Message, DecodeError> {
    let n = Message::frame_len([b[0], b[1], b[2], b[3]])?;
    assert_eq!(n, b.len() - 4);
    Message::decode(&b[4..])
}

fn samples() -> Vec<Message> {
    let endpoints = vec![
        ("tcp".to_string(), b"127.0.0.1:9".to_vec()),
        ("shm".to_string(), vec![0, 1, 2, 255]),
    ];
    vec![
        Message::Hello {
            version: BOOTSTRAP_VERSION,
            job: "job".into(),
            group: 1,
            groups: 2,
            role: Role::Ffn,
            preferred_rank: Some(3),
            m: 2,
            n: 4,
            geometry: Geometry {
                stages: 3,
                max_tokens: 128,
                row_bytes: 7168,
                out_row_bytes: 14336,
                side_bytes: 64,
            },
            layout: StageLayout::Matrix,
            host_id: "h".into(),
            endpoints: endpoints.clone(),
        },
        Message::AddressBook {
            epoch: 9,
            role: Role::Attention,
            rank: 1,
            entries: vec![Entry {
                role: Role::Ffn,
                rank: 0,
                host_id: "x".into(),
                endpoints,
            }],
        },
        Message::Refused {
            reason: "no".into(),
        },
        Message::BarrierEnter { epoch: 1 },
        Message::BarrierRelease { epoch: 1 },
        Message::Bye,
        Message::LinkHello {
            epoch: 5,
            role: Role::Attention,
            rank: 7,
        },
        Message::LinkAck { epoch: 5 },
        Message::Greeting {
            version: BOOTSTRAP_VERSION,
            nonce: [7; NONCE_LEN],
            token: true,
        },
        Message::Challenge {
            nonce: [1; NONCE_LEN],
        },
        Message::Proof { mac: [2; MAC_LEN] },
        Message::AuthRefused {
            reason: "wrong token".into(),
        },
        Message::Report {
            text: "{\"role\":\"attention\"}".into(),
        },
        Message::JobFailed {
            cause: FailCause::Mismatch,
            rank: Some((Role::Attention, 1)),
            reason: "A1 asked for max_tokens 64, the job has 128".into(),
        },
        Message::JobFailed {
            cause: FailCause::Timeout,
            rank: None,
            reason: "late".into(),
        },
        Message::ClockProbe { sent_ns: 17 },
        Message::ClockEcho {
            probe_ns: 17,
            received_ns: 1 << 60,
            sent_ns: (1 << 60) + 5,
        },
        Message::SyncEnter {
            seq: 3,
            roles: Roles {
                attention: true,
                ffn: false,
            },
            scope: Scope::Group,
        },
        Message::SyncRelease {
            seq: 3,
            roles: Roles {
                attention: true,
                ffn: true,
            },
            scope: Scope::Group,
        },
        Message::SyncEnter {
            seq: 1 << 40,
            roles: Roles {
                attention: false,
                ffn: true,
            },
            scope: Scope::AllGroups,
        },
        Message::SyncRelease {
            seq: 7,
            roles: Roles {
                attention: false,
                ffn: true,
            },
            scope: Scope::AllGroups,
        },
    ]
}

#[test]
fn a_hello_outside_its_groups_is_refused() {
    let mut hello = samples().remove(0);
    if let Message::Hello { group, .. } = &mut hello {
        *group = 2;
    }
    let e = decode_frame(&hello.encode()).unwrap_err();
    assert!(e.0.contains("instance group 2 of 2"), "{e}");
}

#[test]
fn an_empty_role_set_is_refused() {
    let mut b = Message::SyncEnter {
        seq: 0,
        roles: Roles {
            attention: true,
            ffn: true,
        },
        scope: Scope::Group,
    }
    .encode();
    let roles = b.len() - 2;
    b[roles] = 0;
    let e = Message::decode(&b[4..]).unwrap_err();
    assert!(e.0.contains("roles"), "{e}");
}

#[test]
fn an_unknown_barrier_scope_is_refused() {
    for bad in [0u8, 3, 255] {
        let mut b = Message::SyncRelease {
            seq: 0,
            roles: Roles {
                attention: true,
                ffn: false,
            },
            scope: Scope::AllGroups,
        }
        .encode();
        let last = b.len() - 1;
        b[last] = bad;
        let e = Message::decode(&b[4..]).unwrap_err();
        assert!(
            e.0.contains("barrier scope") && e.0.contains(&bad.to_string()),
            "{e}"
        );
    }
}

#[test]
fn a_barrier_without_its_scope_is_refused() {
    // A v6 peer from before scopes: the frame ends after the roles.
    let b = Message::SyncEnter {
        seq: 2,
        roles: Roles {
            attention: true,
            ffn: true,
        },
        scope: Scope::Group,
    }
    .encode();
    let e = Message::decode(&b[4..b.len() - 1]).unwrap_err();
    assert!(e.0.contains("scope"), "{e}");
}

#[test]
fn samples_round_trip() {
    for m in samples() {
        assert_eq!(decode_frame(&m.encode()).unwrap(), m);
    }
}

#[test]
fn other_versions_are_named() {
    let mut b = Message::Greeting {
        version: BOOTSTRAP_VERSION,
        nonce: [0; NONCE_LEN],
        token: false,
    }
    .encode();
    b[5..7].copy_from_slice(&(BOOTSTRAP_VERSION - 1).to_le_bytes());
    let e = Message::decode(&b[4..]).unwrap_err();
    let want = format!("bootstrap version {}", BOOTSTRAP_VERSION - 1);
    assert!(e.0.contains(&want), "{e}");
}

#[test]
fn oversized_frame_refused() {
    assert!(Message::frame_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
    assert!(Message::frame_len([0; 4]).is_err());
}

proptest! {
    #[test]
    fn garbage_decodes_or_errors(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::decode(&b);
    }

    #[test]
    fn truncated_samples_error(i in 0usize..21, cut in 1usize..64) {
        let m = &samples()[i];
        let b = m.encode();
        let body = &b[4..];
        if cut < body.len() {
            prop_assert!(Message::decode(&body[..body.len() - cut]).is_err());
        }
    }

    #[test]
    fn hello_round_trips(job in ".{0,40}", host in "[a-z0-9.]{0,30}", pr in proptest::option::of(0u32..1000),
                         m in any::<u32>(), n in any::<u32>(), blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4)) {
        let msg = Message::Hello {
            version: BOOTSTRAP_VERSION,
            job,
            group: 0,
            groups: 1,
            role: Role::Attention,
            preferred_rank: pr,
            m,
            n,
            geometry: Geometry { stages: 1, max_tokens: 2, row_bytes: 3, out_row_bytes: 4, side_bytes: 5 },
            layout: StageLayout::Slots,
            host_id: host.clone(),
            endpoints: blobs.into_iter().enumerate().map(|(i, b)| (format!("b{i}"), b)).collect(),
        };
        prop_assert_eq!(decode_frame(&msg.encode()).unwrap(), msg);
    }
}
