//! Bootstrap messages: what ranks and the rendezvous server say to each
//! other while a mesh forms, and the link handshake between two ranks.
//!
//! Framing is a u32 little-endian length, then a tag byte, then the fields.
//! [`Message::decode`] checks every length and value, so a stranger sending
//! garbage gets an error, never a panic or a huge allocation.

use super::codec::{DecodeError, Reader, Writer};

/// Bootstrap protocol version, carried in `Hello`.
pub const BOOTSTRAP_VERSION: u16 = 3;
/// Largest bootstrap frame accepted.
pub const MAX_FRAME: usize = 1 << 20;

/// The two sides of the bipartite mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Attention rank (sends dispatch, receives combine).
    Attention,
    /// FFN rank (receives dispatch, sends combine).
    Ffn,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Attention => 1,
            Role::Ffn => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Role, DecodeError> {
        match v {
            1 => Ok(Role::Attention),
            2 => Ok(Role::Ffn),
            _ => Err(DecodeError::new(format!("role: unknown value {v}"))),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Attention => "attention",
            Role::Ffn => "ffn",
        })
    }
}

/// A registered region as a peer sees it: enough to target a write.
/// `id` names the region to software transports; `addr`/`rkey` are what the
/// verbs transport needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RegionKey {
    /// Region id within the owning rank's transport.
    pub id: u32,
    /// Remote rkey (verbs); 0 elsewhere.
    pub rkey: u32,
    /// Base address (verbs); 0 elsewhere.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The stage geometry every rank of a mesh must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Stages (micro-batches in flight).
    pub stages: u32,
    /// Most tokens one attention rank dispatches per stage.
    pub max_tokens: u32,
    /// Bytes of one dispatched row.
    pub row_bytes: u32,
    /// Bytes of one combined row.
    pub out_row_bytes: u32,
    /// Most bytes of the side block.
    pub side_bytes: u32,
}

/// One rank in the address book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its role.
    pub role: Role,
    /// Its rank within the role.
    pub rank: u32,
    /// Host identity, for logs (backends judge reachability themselves).
    pub host_id: String,
    /// One opaque endpoint blob per backend it offers, by backend name.
    pub endpoints: Vec<(String, Vec<u8>)>,
}

/// A bootstrap message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Rank → server: who I am and how to reach me.
    Hello {
        /// [`BOOTSTRAP_VERSION`].
        version: u16,
        /// Job name; ranks of another job are refused.
        job: String,
        /// Role.
        role: Role,
        /// Preferred rank, if any.
        preferred_rank: Option<u32>,
        /// Attention ranks the rank expects.
        m: u32,
        /// FFN ranks the rank expects.
        n: u32,
        /// Stage geometry.
        geometry: Geometry,
        /// Host identity, for logs.
        host_id: String,
        /// My endpoint blob per backend, by backend name.
        endpoints: Vec<(String, Vec<u8>)>,
    },
    /// Server → rank: your rank and everyone's entry.
    AddressBook {
        /// Mesh incarnation; links carry it so a stale rank is refused.
        epoch: u64,
        /// Your role.
        role: Role,
        /// Your rank.
        rank: u32,
        /// Every rank of the mesh.
        entries: Vec<Entry>,
    },
    /// Server → rank: you are not admitted, and why.
    Refused {
        /// Reason.
        reason: String,
    },
    /// Rank → server: I reached the barrier.
    BarrierEnter {
        /// Epoch.
        epoch: u64,
    },
    /// Server → rank: everyone reached it.
    BarrierRelease {
        /// Epoch.
        epoch: u64,
    },
    /// Rank → server: I am leaving in order.
    Bye,
    /// Rank → rank, first thing on a new link.
    LinkHello {
        /// Epoch of the address book.
        epoch: u64,
        /// Sender's role.
        role: Role,
        /// Sender's rank.
        rank: u32,
    },
    /// Rank → rank: link accepted.
    LinkAck {
        /// Epoch.
        epoch: u64,
    },
}

fn put_endpoints(w: &mut Writer, endpoints: &[(String, Vec<u8>)]) {
    w.u32(endpoints.len() as u32);
    for (name, blob) in endpoints {
        w.str(name);
        w.bytes(blob);
    }
}

fn get_endpoints(r: &mut Reader<'_>) -> Result<Vec<(String, Vec<u8>)>, DecodeError> {
    let n = r.count("endpoints")?;
    (0..n)
        .map(|_| Ok((r.str("endpoint.backend")?, r.bytes("endpoint.blob")?)))
        .collect()
}

impl Message {
    /// Encodes as a frame: length prefix, tag, fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(0); // patched below
        match self {
            Message::Hello {
                version,
                job,
                role,
                preferred_rank,
                m,
                n,
                geometry,
                host_id,
                endpoints,
            } => {
                w.u8(1);
                w.u16(*version);
                w.str(job);
                w.u8(role.to_u8());
                w.u32(preferred_rank.map_or(u32::MAX, |r| r));
                w.u32(*m);
                w.u32(*n);
                w.u32(geometry.stages);
                w.u32(geometry.max_tokens);
                w.u32(geometry.row_bytes);
                w.u32(geometry.out_row_bytes);
                w.u32(geometry.side_bytes);
                w.str(host_id);
                put_endpoints(&mut w, endpoints);
            }
            Message::AddressBook {
                epoch,
                role,
                rank,
                entries,
            } => {
                w.u8(2);
                w.u64(*epoch);
                w.u8(role.to_u8());
                w.u32(*rank);
                w.u32(entries.len() as u32);
                for e in entries {
                    w.u8(e.role.to_u8());
                    w.u32(e.rank);
                    w.str(&e.host_id);
                    put_endpoints(&mut w, &e.endpoints);
                }
            }
            Message::Refused { reason } => {
                w.u8(3);
                w.str(reason);
            }
            Message::BarrierEnter { epoch } => {
                w.u8(4);
                w.u64(*epoch);
            }
            Message::BarrierRelease { epoch } => {
                w.u8(5);
                w.u64(*epoch);
            }
            Message::Bye => w.u8(6),
            Message::LinkHello { epoch, role, rank } => {
                w.u8(7);
                w.u64(*epoch);
                w.u8(role.to_u8());
                w.u32(*rank);
            }
            Message::LinkAck { epoch } => {
                w.u8(8);
                w.u64(*epoch);
            }
        }
        let mut b = w.finish();
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// Reads the frame length from a 4-byte prefix, checked against
    /// [`MAX_FRAME`].
    pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
        let n = u32::from_le_bytes(prefix) as usize;
        if n == 0 || n > MAX_FRAME {
            return Err(DecodeError::new(format!(
                "frame length {n} outside 1..={MAX_FRAME}"
            )));
        }
        Ok(n)
    }

    /// Decodes a frame body (the bytes after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader::new(body);
        let tag = r.u8("tag")?;
        let m = match tag {
            1 => {
                let version = r.u16("version")?;
                if version != BOOTSTRAP_VERSION {
                    return Err(DecodeError::new(format!(
                        "hello: bootstrap version {version}, this build speaks {BOOTSTRAP_VERSION}"
                    )));
                }
                let job = r.str("job")?;
                let role = Role::from_u8(r.u8("role")?)?;
                let pr = r.u32("preferred_rank")?;
                Message::Hello {
                    version,
                    job,
                    role,
                    preferred_rank: (pr != u32::MAX).then_some(pr),
                    m: r.u32("m")?,
                    n: r.u32("n")?,
                    geometry: Geometry {
                        stages: r.u32("stages")?,
                        max_tokens: r.u32("max_tokens")?,
                        row_bytes: r.u32("row_bytes")?,
                        out_row_bytes: r.u32("out_row_bytes")?,
                        side_bytes: r.u32("side_bytes")?,
                    },
                    host_id: r.str("host_id")?,
                    endpoints: get_endpoints(&mut r)?,
                }
            }
            2 => {
                let epoch = r.u64("epoch")?;
                let role = Role::from_u8(r.u8("role")?)?;
                let rank = r.u32("rank")?;
                let n = r.count("entries")?;
                let mut entries = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    entries.push(Entry {
                        role: Role::from_u8(r.u8("entry.role")?)?,
                        rank: r.u32("entry.rank")?,
                        host_id: r.str("entry.host_id")?,
                        endpoints: get_endpoints(&mut r)?,
                    });
                }
                Message::AddressBook {
                    epoch,
                    role,
                    rank,
                    entries,
                }
            }
            3 => Message::Refused {
                reason: r.str("reason")?,
            },
            4 => Message::BarrierEnter {
                epoch: r.u64("epoch")?,
            },
            5 => Message::BarrierRelease {
                epoch: r.u64("epoch")?,
            },
            6 => Message::Bye,
            7 => Message::LinkHello {
                epoch: r.u64("epoch")?,
                role: Role::from_u8(r.u8("role")?)?,
                rank: r.u32("rank")?,
            },
            8 => Message::LinkAck {
                epoch: r.u64("epoch")?,
            },
            t => return Err(DecodeError::new(format!("tag: unknown message {t}"))),
        };
        r.end("message")?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
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
        ]
    }

    #[test]
    fn samples_round_trip() {
        for m in samples() {
            assert_eq!(decode_frame(&m.encode()).unwrap(), m);
        }
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
        fn truncated_samples_error(i in 0usize..8, cut in 1usize..64) {
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
                role: Role::Attention,
                preferred_rank: pr,
                m,
                n,
                geometry: Geometry { stages: 1, max_tokens: 2, row_bytes: 3, out_row_bytes: 4, side_bytes: 5 },
                host_id: host.clone(),
                endpoints: blobs.into_iter().enumerate().map(|(i, b)| (format!("b{i}"), b)).collect(),
            };
            prop_assert_eq!(decode_frame(&msg.encode()).unwrap(), msg);
        }
    }
}
