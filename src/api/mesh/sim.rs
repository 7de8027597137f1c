//! Whole meshes on a simulated network, in one process: the harness that
//! protocol and API tests build their M×N meshes with.

use super::*;

/// Builds a whole M×N mesh on a simulated network, in this process: the
/// harness for protocol tests. Ranks are returned by rank.
pub fn sim_mesh(
    net: &SimNetwork,
    m: u32,
    n: u32,
    spec: StageSpec,
) -> Result<(Vec<AttentionRank>, Vec<FfnRank>)> {
    sim_mesh_with(net, m, n, spec, MemoryKind::Host, false, StageLayout::Slots)
}

/// [`sim_mesh`] with the FFN ranks' input laid out as `layout`. The
/// matrix layout needs an ordered network
/// ([`SimNetwork::set_ordered`]); on another it is a `Config` error.
pub fn sim_mesh_with_layout(
    net: &SimNetwork,
    m: u32,
    n: u32,
    spec: StageSpec,
    layout: StageLayout,
) -> Result<(Vec<AttentionRank>, Vec<FfnRank>)> {
    sim_mesh_with(net, m, n, spec, MemoryKind::Host, false, layout)
}

/// [`sim_mesh`] with every rank sending and requiring a CRC32C in every
/// message ([`MeshConfig::checksum`]).
pub fn sim_mesh_with_checksums(
    net: &SimNetwork,
    m: u32,
    n: u32,
    spec: StageSpec,
) -> Result<(Vec<AttentionRank>, Vec<FfnRank>)> {
    sim_mesh_with(net, m, n, spec, MemoryKind::Host, true, StageLayout::Slots)
}

/// As [`sim_mesh`], with every rank's stage memory labelled `kind`: for a
/// CUDA kind, host memory stands in for the GPU's (and the network must
/// move it: [`SimNetwork::set_device_stand_in`]), so the memory-kind
/// plumbing of the API runs without a GPU.
pub fn sim_mesh_in(
    net: &SimNetwork,
    m: u32,
    n: u32,
    spec: StageSpec,
    kind: MemoryKind,
) -> Result<(Vec<AttentionRank>, Vec<FfnRank>)> {
    sim_mesh_with(net, m, n, spec, kind, false, StageLayout::Slots)
}

pub(crate) fn sim_mesh_with(
    net: &SimNetwork,
    m: u32,
    n: u32,
    spec: StageSpec,
    kind: MemoryKind,
    checksum: bool,
    stage_layout: StageLayout,
) -> Result<(Vec<AttentionRank>, Vec<FfnRank>)> {
    let make = |len: usize| -> Result<Region> {
        match kind {
            MemoryKind::Host => Region::alloc(len),
            k => Region::host_standing_in_for(k, len),
        }
        .map_err(Error::config)
    };
    let layout = Layout::new(spec, m, n, stage_layout)?;
    struct Side {
        mux: Mux,
        region: Arc<Region>,
        send: SendSlots,
        send_key: LocalKey,
    }
    let side = |len: usize, role: Role| -> Result<Side> {
        let mut mux = Mux::new(
            vec![Backend::Sim(net.endpoint())],
            crate::transport::PollPolicy::default(),
        );
        let region = Arc::new(make(len)?);
        mux.register(&region, Access::RemoteWrite)?;
        let send = layout.send_slots_from(role, make)?;
        let send_key = mux.register(send.region(), Access::Local)?;
        Ok(Side {
            mux,
            region,
            send,
            send_key,
        })
    };
    let mut a: Vec<Side> = (0..m)
        .map(|_| side(layout.out_region_len().unwrap_or(0), Role::Attention))
        .collect::<Result<_>>()?;
    let mut f: Vec<Side> = (0..n)
        .map(|_| side(layout.in_region_len().unwrap_or(0), Role::Ffn))
        .collect::<Result<_>>()?;
    if let Some(s) = a.first() {
        let b = &s.mux.backends()[0];
        if !in_order(stage_layout, &b.caps()) {
            return Err(unordered(Peer::Attention(0), Peer::Ffn(0), b.name()));
        }
    }
    let a_blobs: Vec<Vec<u8>> = a.iter().map(|s| s.mux.backends()[0].endpoint()).collect();
    let f_blobs: Vec<Vec<u8>> = f.iter().map(|s| s.mux.backends()[0].endpoint()).collect();
    let spec_for = |label: String, blob: &[u8], initiator, peer_rank, my_rank| PeerSpec {
        label,
        blob: blob.to_vec(),
        initiator,
        peer_rank,
        my_rank,
        epoch: 1,
    };
    let mut a_peers = Vec::new();
    for (i, s) in a.iter_mut().enumerate() {
        let specs: Vec<PeerSpec> = (0..n)
            .map(|j| spec_for(format!("F{j}"), &f_blobs[j as usize], true, j, i as u32))
            .collect();
        let up = s.mux.connect(0, &specs, Duration::ZERO)?;
        a_peers.push(
            up.into_iter()
                .enumerate()
                .map(|(j, c)| (Peer::Ffn(j as u32), c.link, c.remote[0]))
                .collect::<Vec<_>>(),
        );
    }
    let mut f_peers = Vec::new();
    for (j, s) in f.iter_mut().enumerate() {
        let specs: Vec<PeerSpec> = (0..m)
            .map(|i| spec_for(format!("A{i}"), &a_blobs[i as usize], false, i, j as u32))
            .collect();
        let up = s.mux.connect(0, &specs, Duration::ZERO)?;
        f_peers.push(
            up.into_iter()
                .enumerate()
                .map(|(i, c)| (Peer::Attention(i as u32), c.link, c.remote[0]))
                .collect::<Vec<_>>(),
        );
    }
    let attn = a
        .into_iter()
        .zip(a_peers)
        .enumerate()
        .map(|(i, (s, p))| {
            let recv = Receive {
                region: s.region,
                places: layout.out_receive(),
            };
            let mut engine =
                Engine::new(s.mux, p, spec, recv, s.send, s.send_key, Support::default());
            engine.set_checksum(checksum);
            AttentionRank::new(engine, layout, i as u32)
        })
        .collect();
    let ffn = f
        .into_iter()
        .zip(f_peers)
        .enumerate()
        .map(|(j, (s, p))| {
            let recv = Receive {
                region: s.region,
                places: layout.in_receive(),
            };
            let mut engine =
                Engine::new(s.mux, p, spec, recv, s.send, s.send_key, Support::default());
            engine.set_checksum(checksum);
            FfnRank::new(engine, layout, j as u32)
        })
        .collect();
    Ok((attn, ffn))
}
