//! The values bootstrap messages carry: roles and role sets, barrier
//! scopes, region keys, stage geometry and layout, address book entries,
//! and why a job failed.

use super::super::codec::DecodeError;

/// The two sides of the bipartite mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Attention rank (sends dispatch, receives combine).
    Attention,
    /// FFN rank (receives dispatch, sends combine).
    Ffn,
}

impl Role {
    pub(super) fn to_u8(self) -> u8 {
        match self {
            Role::Attention => 1,
            Role::Ffn => 2,
        }
    }
    pub(super) fn from_u8(v: u8) -> Result<Role, DecodeError> {
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

/// Which roles a running mesh's barrier ([`Message::SyncEnter`]) waits
/// for: at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Roles {
    /// Attention ranks take part.
    pub attention: bool,
    /// FFN ranks take part.
    pub ffn: bool,
}

impl Roles {
    /// Whether ranks of `role` take part.
    pub fn has(self, role: Role) -> bool {
        match role {
            Role::Attention => self.attention,
            Role::Ffn => self.ffn,
        }
    }
    pub(super) fn to_u8(self) -> u8 {
        u8::from(self.attention) | (u8::from(self.ffn) << 1)
    }
    pub(super) fn from_u8(v: u8) -> Result<Roles, DecodeError> {
        match v {
            1..=3 => Ok(Roles {
                attention: v & 1 != 0,
                ffn: v & 2 != 0,
            }),
            _ => Err(DecodeError::new(format!("roles: unknown set {v}"))),
        }
    }
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.attention, self.ffn) {
            (true, true) => "attention and ffn",
            (true, false) => "attention",
            (false, true) => "ffn",
            (false, false) => "no",
        })
    }
}

/// How far a running barrier ([`Message::SyncEnter`]) reaches in a job
/// of several instance groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The ranks of those roles in this rank's own group's mesh
    /// (StepMesh's group-level barrier, `instance_barrier=False`).
    Group,
    /// The ranks of those roles in every instance group (StepMesh's
    /// `instance_barrier=True`). A job of one group treats it as `Group`.
    AllGroups,
}

impl Scope {
    /// 0 for `Group`, 1 for `AllGroups`: an index into per-scope counts.
    pub fn index(self) -> usize {
        match self {
            Scope::Group => 0,
            Scope::AllGroups => 1,
        }
    }
    pub(super) fn to_u8(self) -> u8 {
        match self {
            Scope::Group => 1,
            Scope::AllGroups => 2,
        }
    }
    pub(super) fn from_u8(v: u8) -> Result<Scope, DecodeError> {
        match v {
            1 => Ok(Scope::Group),
            2 => Ok(Scope::AllGroups),
            _ => Err(DecodeError::new(format!(
                "barrier scope: unknown value {v}"
            ))),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Group => "this instance group",
            Scope::AllGroups => "every instance group",
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

/// Where a stage's dispatches land on an FFN rank. Every rank of a mesh
/// must use the same one; the scheduler refuses a rank that differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StageLayout {
    /// Each attention rank's message in a slot of its own: header, side
    /// area, rows. One write per message.
    #[default]
    Slots,
    /// The rows of all M attention ranks form one `[M × max_tokens,
    /// row_bytes]` matrix (rank `a`'s rows from row `a × max_tokens`); the
    /// headers and side areas sit in an area of their own. Two writes per
    /// message on one link (rows, then header and side area with the imm),
    /// so it needs backends that deliver a link's writes in order.
    Matrix,
}

impl StageLayout {
    /// Parses `slots` or `matrix`.
    pub fn parse(s: &str) -> Result<StageLayout, String> {
        match s {
            "slots" => Ok(StageLayout::Slots),
            "matrix" => Ok(StageLayout::Matrix),
            _ => Err(format!("layout {s:?}: expected slots or matrix")),
        }
    }

    /// Its name, as `parse` reads it.
    pub fn name(self) -> &'static str {
        match self {
            StageLayout::Slots => "slots",
            StageLayout::Matrix => "matrix",
        }
    }

    pub(super) fn to_u8(self) -> u8 {
        match self {
            StageLayout::Slots => 0,
            StageLayout::Matrix => 1,
        }
    }

    pub(super) fn from_u8(v: u8) -> Result<StageLayout, DecodeError> {
        match v {
            0 => Ok(StageLayout::Slots),
            1 => Ok(StageLayout::Matrix),
            _ => Err(DecodeError::new(format!("layout: unknown value {v}"))),
        }
    }
}

impl std::fmt::Display for StageLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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

/// Why a job could not form, as the rendezvous server tells its ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailCause {
    /// A rank asked for something the job does not agree with (geometry,
    /// job name, mesh size, a rank taken or out of range).
    Mismatch,
    /// A rank died or left before the mesh formed.
    Lost,
    /// The mesh did not form within the server's join timeout.
    Timeout,
}

impl FailCause {
    pub(super) fn to_u8(self) -> u8 {
        match self {
            FailCause::Mismatch => 1,
            FailCause::Lost => 2,
            FailCause::Timeout => 3,
        }
    }
    pub(super) fn from_u8(v: u8) -> Result<FailCause, DecodeError> {
        match v {
            1 => Ok(FailCause::Mismatch),
            2 => Ok(FailCause::Lost),
            3 => Ok(FailCause::Timeout),
            _ => Err(DecodeError::new(format!("cause: unknown value {v}"))),
        }
    }
}
