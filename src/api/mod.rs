//! The public API: a [`Mesh`] is joined as an [`AttentionRank`] or an
//! [`FfnRank`]; attention ranks `dispatch` and wait for the combine, FFN
//! ranks get gathered batches and `respond`.

mod attention;
mod config;
mod ffn;
mod layout;
mod mesh;
pub mod reduce;
mod stream_wait;

pub use crate::engine::RankStats;
pub use crate::proto::StageLayout;
pub use attention::{AttentionRank, Combined, DispatchHandle, Trace};
pub use config::{MeshConfig, SchedulerEnv, TransportKind};
pub use ffn::{Batch, FfnRank, RespondError};
pub use mesh::{sim_mesh, sim_mesh_in, sim_mesh_with_checksums, sim_mesh_with_layout, Mesh, Rank};
pub use reduce::Dtype;

/// The stage geometry: stages, most tokens per attention rank, bytes of a
/// dispatched row, of a combined row, and of the side block. Every rank of a
/// mesh must use the same one; the scheduler refuses a rank that differs.
pub use crate::proto::Geometry as StageSpec;
