//! The sans-IO protocol: the wire header written in front of every message,
//! the immediate value that announces it, the acceptance of an arrival, the
//! bootstrap messages, and the per-stage state machines of both roles.
//!
//! Nothing here does I/O, reads a clock, spawns a thread or uses `unsafe`:
//! callers feed bytes and events in and act on what comes out, which is what
//! lets the `sim` transport and the property tests drive it exhaustively.
#![forbid(unsafe_code)]

pub mod accept;
pub mod bootstrap;
pub mod codec;
pub mod header;
pub mod stage;

pub use accept::{accept, Accepted};
pub use bootstrap::{
    Entry, FailCause, Geometry, Message, RegionKey, Role, Roles, Scope, StageLayout,
};
pub use codec::DecodeError;
pub use header::{Header, Imm, Kind, HEADER_LEN};
pub use stage::{AttentionStages, FfnStages, Field, Reject, StageCounter};
