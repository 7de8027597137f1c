//! Bootstrap messages: what ranks and the rendezvous server say to each
//! other while a mesh forms, and the link handshake between two ranks.
//!
//! Framing is a u32 little-endian length, then a tag byte, then the fields.
//! [`Message::decode`] checks every length and value, so a stranger sending
//! garbage gets an error, never a panic or a huge allocation.
//!
//! Every connection (rank to scheduler, attention rank to FFN rank) opens
//! with the same authentication exchange, the side that connected
//! speaking first:
//!
//! ```text
//! initiator                               acceptor
//!   Greeting { version, nonce_i, token } ->
//!                                        <- Challenge { nonce_a }  (or AuthRefused)
//!   -- only when both hold a cluster token: --
//!   Proof { HMAC(token, initiator, nonce_i, nonce_a) } ->
//!                                        <- Proof { HMAC(token, acceptor, ...) }  (or AuthRefused)
//! ```
//!
//! The token itself never crosses the wire. Then the rendezvous goes
//! (`ClockProbe` → `ClockEcho`, a few times, when the rank traces)
//! `Hello` → `AddressBook` → `BarrierEnter` → `BarrierRelease` → `Bye`,
//! where the server may instead answer `Refused` (this rank is not
//! admitted) or, to every rank of an attempt at once, `JobFailed` (the job
//! cannot form: a rank was refused, died, or the mesh did not form in
//! time). Between the barrier and `Bye`, a running mesh's ranks may
//! synchronise again: `SyncEnter` → `SyncRelease`, numbered per set of
//! roles and scope, released once every rank of those roles has entered
//! (of the rank's own instance group, or of every group).

use super::codec::{DecodeError, Reader, Writer};

mod types;
pub use types::{Entry, FailCause, Geometry, RegionKey, Role, Roles, Scope, StageLayout};

/// Bootstrap protocol version, carried in `Hello`.
/// 5: `ClockProbe`/`ClockEcho` before the hello (clock offsets for traces).
/// 6: the hello names the rank's instance group (`group` of `groups`:
/// StepMesh's `DMLC_GROUP_SIZE` disjoint meshes under one scheduler), and
/// `SyncEnter`/`SyncRelease` give a running mesh barriers, of its own group
/// or of every group ([`Scope`]); it also carries the stage layout
/// ([`StageLayout`]).
pub const BOOTSTRAP_VERSION: u16 = 6;
/// Most clock probes the server answers on one connection.
pub const MAX_CLOCK_PROBES: u32 = 64;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a handshake proof (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Largest bootstrap frame accepted.
pub const MAX_FRAME: usize = 1 << 20;

/// A bootstrap message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Rank → server: who I am and how to reach me.
    Hello {
        /// [`BOOTSTRAP_VERSION`].
        version: u16,
        /// Job name; ranks of another job are refused.
        job: String,
        /// The rank's instance group: the mesh of the job it joins.
        group: u32,
        /// Instance groups (disjoint meshes) the rank expects the job to have.
        groups: u32,
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
        /// Where dispatches land on FFN ranks.
        layout: StageLayout,
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
    /// Initiator → acceptor, first on every connection.
    Greeting {
        /// [`BOOTSTRAP_VERSION`].
        version: u16,
        /// Fresh random nonce.
        nonce: [u8; NONCE_LEN],
        /// Whether the initiator holds a cluster token.
        token: bool,
    },
    /// Acceptor → initiator: its fresh nonce; the greeting was accepted.
    Challenge {
        /// Fresh random nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// Either side: proof of the token over both nonces.
    Proof {
        /// HMAC-SHA256 (see `bootstrap::auth`).
        mac: [u8; MAC_LEN],
    },
    /// Either side: authentication failed; the connection closes.
    AuthRefused {
        /// Reason.
        reason: String,
    },
    /// Server → every rank of a setup attempt: the job cannot form.
    JobFailed {
        /// What went wrong.
        cause: FailCause,
        /// The rank it is about, when there is one.
        rank: Option<(Role, u32)>,
        /// What went wrong, for people.
        reason: String,
    },
    /// Rank → server, after the barrier and before `Bye`: the rank's
    /// results (a JSON object, as `afmesh run --json` prints it), for the
    /// job summary the server prints when the mesh finishes.
    Report {
        /// The results, at most [`MAX_BLOB`](super::codec::MAX_BLOB) bytes.
        text: String,
    },
    /// Rank → server, before the hello: what time is it? (NTP-style.)
    ClockProbe {
        /// The rank's wall clock when it sent this (ns).
        sent_ns: u64,
    },
    /// Rank → server, in a running mesh: I reached barrier `seq` of
    /// `roles` in `scope` (the ranks count their barriers per set of
    /// roles and scope).
    SyncEnter {
        /// This rank's count of earlier barriers of `roles` in `scope`.
        seq: u64,
        /// Who the barrier waits for.
        roles: Roles,
        /// This rank's group only, or every instance group.
        scope: Scope,
    },
    /// Server → every rank of `roles` (in `scope`): all of them entered
    /// barrier `seq`.
    SyncRelease {
        /// The barrier's number.
        seq: u64,
        /// Who it waited for.
        roles: Roles,
        /// Where it waited.
        scope: Scope,
    },
    /// Server → rank: the answer to a probe, at once.
    ClockEcho {
        /// The probe's `sent_ns`, echoed.
        probe_ns: u64,
        /// The server's wall clock when the probe arrived (ns).
        received_ns: u64,
        /// The server's wall clock when it sent this (ns).
        sent_ns: u64,
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
    /// What kind of message this is, in words (for errors and logs).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::AddressBook { .. } => "address book",
            Message::Refused { .. } => "refusal",
            Message::BarrierEnter { .. } => "barrier entry",
            Message::BarrierRelease { .. } => "barrier release",
            Message::Bye => "bye",
            Message::LinkHello { .. } => "link hello",
            Message::LinkAck { .. } => "link ack",
            Message::Greeting { .. } => "greeting",
            Message::Challenge { .. } => "challenge",
            Message::Proof { .. } => "proof",
            Message::AuthRefused { .. } => "auth refusal",
            Message::JobFailed { .. } => "job failure",
            Message::Report { .. } => "report",
            Message::ClockProbe { .. } => "clock probe",
            Message::ClockEcho { .. } => "clock echo",
            Message::SyncEnter { .. } => "barrier entry (running)",
            Message::SyncRelease { .. } => "barrier release (running)",
        }
    }

    /// Encodes as a frame: length prefix, tag, fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(0); // patched below
        match self {
            Message::Hello {
                version,
                job,
                group,
                groups,
                role,
                preferred_rank,
                m,
                n,
                geometry,
                layout,
                host_id,
                endpoints,
            } => {
                w.u8(1);
                w.u16(*version);
                w.str(job);
                w.u32(*group);
                w.u32(*groups);
                w.u8(role.to_u8());
                w.u32(preferred_rank.map_or(u32::MAX, |r| r));
                w.u32(*m);
                w.u32(*n);
                w.u32(geometry.stages);
                w.u32(geometry.max_tokens);
                w.u32(geometry.row_bytes);
                w.u32(geometry.out_row_bytes);
                w.u32(geometry.side_bytes);
                w.u8(layout.to_u8());
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
            Message::Greeting {
                version,
                nonce,
                token,
            } => {
                w.u8(9);
                w.u16(*version);
                w.array(nonce);
                w.u8(u8::from(*token));
            }
            Message::Challenge { nonce } => {
                w.u8(10);
                w.array(nonce);
            }
            Message::Proof { mac } => {
                w.u8(11);
                w.array(mac);
            }
            Message::AuthRefused { reason } => {
                w.u8(12);
                w.str(reason);
            }
            Message::JobFailed {
                cause,
                rank,
                reason,
            } => {
                w.u8(13);
                w.u8(cause.to_u8());
                match rank {
                    Some((role, r)) => {
                        w.u8(role.to_u8());
                        w.u32(*r);
                    }
                    None => {
                        w.u8(0);
                        w.u32(0);
                    }
                }
                w.str(reason);
            }
            Message::Report { text } => {
                w.u8(14);
                w.bytes(text.as_bytes());
            }
            Message::ClockProbe { sent_ns } => {
                w.u8(15);
                w.u64(*sent_ns);
            }
            Message::ClockEcho {
                probe_ns,
                received_ns,
                sent_ns,
            } => {
                w.u8(16);
                w.u64(*probe_ns);
                w.u64(*received_ns);
                w.u64(*sent_ns);
            }
            Message::SyncEnter { seq, roles, scope } => {
                w.u8(17);
                w.u64(*seq);
                w.u8(roles.to_u8());
                w.u8(scope.to_u8());
            }
            Message::SyncRelease { seq, roles, scope } => {
                w.u8(18);
                w.u64(*seq);
                w.u8(roles.to_u8());
                w.u8(scope.to_u8());
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
                let group = r.u32("group")?;
                let groups = r.u32("groups")?;
                if groups == 0 || group >= groups {
                    return Err(DecodeError::new(format!(
                        "hello: instance group {group} of {groups}"
                    )));
                }
                let role = Role::from_u8(r.u8("role")?)?;
                let pr = r.u32("preferred_rank")?;
                Message::Hello {
                    version,
                    job,
                    group,
                    groups,
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
                    layout: StageLayout::from_u8(r.u8("layout")?)?,
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
            9 => {
                let version = r.u16("version")?;
                if version != BOOTSTRAP_VERSION {
                    return Err(DecodeError::new(format!(
                        "greeting: bootstrap version {version}, this build speaks {BOOTSTRAP_VERSION}"
                    )));
                }
                Message::Greeting {
                    version,
                    nonce: r.array("nonce")?,
                    token: match r.u8("token")? {
                        0 => false,
                        1 => true,
                        v => return Err(DecodeError::new(format!("token: flag {v}"))),
                    },
                }
            }
            10 => Message::Challenge {
                nonce: r.array("nonce")?,
            },
            11 => Message::Proof {
                mac: r.array("mac")?,
            },
            12 => Message::AuthRefused {
                reason: r.str("reason")?,
            },
            13 => {
                let cause = FailCause::from_u8(r.u8("cause")?)?;
                let role = r.u8("rank.role")?;
                let rank = r.u32("rank")?;
                Message::JobFailed {
                    cause,
                    rank: match role {
                        0 => None,
                        v => Some((Role::from_u8(v)?, rank)),
                    },
                    reason: r.str("reason")?,
                }
            }
            14 => Message::Report {
                text: String::from_utf8(r.bytes("report")?)
                    .map_err(|_| DecodeError::new("report: not UTF-8"))?,
            },
            15 => Message::ClockProbe {
                sent_ns: r.u64("sent_ns")?,
            },
            16 => Message::ClockEcho {
                probe_ns: r.u64("probe_ns")?,
                received_ns: r.u64("received_ns")?,
                sent_ns: r.u64("sent_ns")?,
            },
            17 => Message::SyncEnter {
                seq: r.u64("seq")?,
                roles: Roles::from_u8(r.u8("roles")?)?,
                scope: Scope::from_u8(r.u8("scope")?)?,
            },
            18 => Message::SyncRelease {
                seq: r.u64("seq")?,
                roles: Roles::from_u8(r.u8("roles")?)?,
                scope: Scope::from_u8(r.u8("scope")?)?,
            },
            t => return Err(DecodeError::new(format!("tag: unknown message {t}"))),
        };
        r.end("message")?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests;
