//! The floors a point is measured against: the device floors (plain peer
//! copies, NCCL send/recv) and the plan of the host floor's processes.

use super::*;

/// The device floors: plain peer copies of the same pattern, and NCCL
/// send/recv of it (or why it was skipped).
pub(super) fn device_floors(
    w: &Workload,
    m: u32,
    n: u32,
) -> Result<(Floors, Result<Summary, String>)> {
    let (d, c) = w.layer_bytes(m, n);
    let per = u64::from(m) * u64::from(n) * u64::from(w.stages);
    let mut pairs = Vec::new();
    for a in 0..m {
        for f in 0..n {
            pairs.push(afmesh::cuda::floor::Pair {
                attention_device: crate::device::device_of(afmesh::Role::Attention, a, m)?,
                ffn_device: crate::device::device_of(afmesh::Role::Ffn, f, m)?,
                dispatch: (d / per) as usize,
                combine: (c / per) as usize,
            });
        }
    }
    let ce = afmesh::cuda::floor::copy_engine(&pairs, w.stages, w.warmup, w.iters)
        .context("copy-engine floor")?;
    let nccl = afmesh::cuda::floor::nccl(&pairs, w.stages, w.warmup, w.iters)
        .map(|h| Summary::of(&h))
        .map_err(|e| e.to_string());
    let ce = Summary::of(&ce);
    Ok((
        Floors {
            exchange: ce.p50,
            exchange_p99: ce.p99,
            exchange_name: "cuMemcpyPeerAsync out and back".into(),
            polled: None,
            memcpy: None,
            unread: None,
        },
        nccl,
    ))
}

/// The floors measured beside one mesh (p50 microseconds).
#[derive(Debug)]
pub(super) struct Floors {
    /// The exchange as the mesh does it, by plain processes.
    pub(super) exchange: f64,
    /// Its p99: how much of a tail the machine gives the plain way.
    pub(super) exchange_p99: f64,
    pub(super) exchange_name: String,
    /// Tcp only: the exchange over polled non-blocking sockets.
    pub(super) polled: Option<f64>,
    /// Shared memory only: one thread's copy of the layer.
    pub(super) memcpy: Option<f64>,
    /// Shared memory only: the exchange whose receivers never read what
    /// they get (reported, not a floor: no byte of it crosses the cores).
    pub(super) unread: Option<f64>,
}

impl Floors {
    /// The fastest plain way: the floor the mesh is held to.
    pub(super) fn best(&self) -> (f64, String) {
        let mut best = (self.exchange, self.exchange_name.clone());
        if let Some(p) = self.polled.filter(|p| *p < best.0) {
            best = (p, format!("{}, polled", self.exchange_name));
        }
        if let Some(c) = self.memcpy.filter(|c| *c < best.0) {
            best = (c, "memcpy, 1 thread".into());
        }
        best
    }
}

/// The exchange floor for `w` on M×N, pinned to `cpus` the way the mesh's
/// ranks are (or not pinned).
pub(super) fn floor_plan(w: &Workload, m: u32, n: u32, cpus: Option<Vec<usize>>) -> floor::Plan {
    // Attention rank a's bytes per FFN rank: what `layer_bytes` adds for
    // it, one FFN rank at a time (headers and side block included).
    let pair = |a: u32| {
        let (d1, c1) = w.layer_bytes(a + 1, 1);
        let (d0, c0) = w.layer_bytes(a, 1);
        (d1 - d0, c1 - c0)
    };
    let (dispatch, combine) = (0..m).map(pair).unzip();
    let rows = w.spec().map_or((0, 0), |s| {
        (u64::from(s.row_bytes), u64::from(s.out_row_bytes))
    });
    floor::Plan {
        m,
        n,
        dispatch,
        combine,
        stages: w.stages,
        rows,
        warmup: w.warmup.max(5),
        iters: w.iters,
        timeout: w.timeout,
        cpus,
    }
}
