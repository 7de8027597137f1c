//! afmesh: M-to-N dispatch and combine for attention–FFN disaggregated
//! (AFD) LLM inference.
//!
//! M attention ranks each **dispatch** a token block to every one of N FFN
//! ranks (a variant all-gather); each FFN rank **combines** its results back
//! to every attention rank (a variant reduce-scatter), with several
//! micro-batches ("stages") in flight. Messages are one-sided writes into
//! slots registered once at setup, announced by an immediate value, counted
//! per (stage, sequence) with no ordering assumed.
//!
//! # Quick start
//!
//! One attention rank and one FFN rank over TCP, the attention rank running
//! the rendezvous server itself:
//!
//! ```
//! use std::time::Duration;
//! use afmesh::{Mesh, MeshConfig, StageSpec};
//!
//! # fn main() -> afmesh::Result<()> {
//! let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
//! let addr = format!("127.0.0.1:{port}");
//! let spec = StageSpec { stages: 2, max_tokens: 4, row_bytes: 8, out_row_bytes: 4, side_bytes: 8 };
//!
//! let ffn = {
//!     let cfg = MeshConfig::new(addr.clone(), 1, 1);
//!     std::thread::spawn(move || -> afmesh::Result<()> {
//!         let mut f = Mesh::new(cfg).ffn(spec)?;
//!         let batch = f.get_batch(Duration::from_secs(10))?;
//!         // Answer each token row with its first 4 bytes.
//!         let out: Vec<u8> = batch.tokens(0).chunks(8).flat_map(|r| r[..4].to_vec()).collect();
//!         f.respond(batch, &[&out])?;
//!         f.shutdown()
//!     })
//! };
//!
//! let mut cfg = MeshConfig::new(addr, 1, 1);
//! cfg.embed_scheduler = true;
//! let mut a = Mesh::new(cfg).attention(spec)?;
//! let tokens: Vec<u8> = (0..24).collect(); // 3 rows of 8 bytes
//! let h = a.dispatch(0, &tokens, b"side")?;
//! let combined = a.wait_combine(h, Duration::from_secs(10))?;
//! assert_eq!(combined.partial(0).unwrap(), &[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]);
//! drop(combined);
//! a.shutdown()?;
//! ffn.join().unwrap()?;
//! # Ok(())
//! # }
//! ```
//!
//! Layers, bottom up: [`proto`] (sans-IO wire format and state machines),
//! [`transport`] (one-sided writes: `sim`, `tcp`), [`bootstrap`]
//! (rendezvous), `engine` (the rank core both roles share: progress,
//! acceptance, sends, stats), and the API re-exported here.

pub mod api;
pub mod bootstrap;
pub mod cuda;
mod engine;
pub mod error;
pub mod metrics;
pub mod proto;
mod sync;
pub mod trace;
pub mod transport;

pub use api::{
    sim_mesh, sim_mesh_in, sim_mesh_with_checksums, sim_mesh_with_layout, AttentionRank, Batch,
    Combined, DispatchHandle, Dtype, FfnRank, Mesh, MeshConfig, Rank, RankStats, RespondError,
    StageLayout, StageSpec, Trace, TransportKind,
};
pub use engine::{Histogram, Interrupter, PeerStats, Straggler};
pub use error::{Error, Peer, Result};
pub use proto::{Role, Roles};
