//! A randomised fault campaign on the simulated network: many seeds, each a
//! random mesh (M, N in 1..=4, 1..=3 stages, random token counts and
//! layers) under random faults (delay, jitter that reorders, drops,
//! duplicates, an early or late `Sent`, a small send window, the death of a
//! link or a rank at a random moment). After each, the invariants:
//!
//! * no corrupted data: every batch an FFN rank gets and every partial an
//!   attention rank gets back has exactly the bytes that were sent;
//! * no lost liveness: without drops or deaths every combine completes;
//! * every failure is reported with the peer named: `PeerLost` only for a
//!   peer across a dead link of that rank (and, without drops, every rank
//!   next to a dead link that waits is told `PeerLost`), `Timeout` naming
//!   peers of the other role; nothing else;
//! * no wait runs past its timeout (wall time, with a margin for a loaded
//!   debug build).
//!
//! Seeds 0, 1, 2 ... (from `AFMESH_SEED_FROM`) run for a time budget
//! (`AFMESH_CAMPAIGN_SECS`, default 30); a failing seed is printed with its
//! plan, and `AFMESH_SEED=<seed>` reruns just that one.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use afmesh::transport::sim::{Faults, SimNetwork};
use afmesh::{sim_mesh, AttentionRank, DispatchHandle, Error, FfnRank, Peer, StageSpec};

const ROW: u32 = 16;
const OUT_ROW: u32 = 8;
const SIDE: u32 = 8;
/// The bound of the waits made after the mesh went quiet.
const WAIT: Duration = Duration::from_millis(20);
/// What a wait may overrun its timeout by on a loaded machine (a wait
/// that ignores its bound overruns by the send timeout, 10 s, or forever).
const MARGIN: Duration = Duration::from_secs(1);
/// A non-blocking call that takes longer than this is stuck.
const STUCK: Duration = Duration::from_secs(2);

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0) % n
    }
    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[self.below(of.len() as u64) as usize]
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    None,
    Link { a: u32, f: u32 },
    Attention(u32),
    Ffn(u32),
}

/// One seed's mesh, workload and faults.
#[derive(Debug)]
struct Plan {
    m: u32,
    n: u32,
    stages: u32,
    max_tokens: u32,
    layers: u32,
    /// Auto mode: every progress delivers all pending events, so a call
    /// that waits for a `Sent` or a free window gets it. Step mode (the
    /// driver delivers one event at a time) keeps `Sent` no later than the
    /// landing (early when writes are duplicated) and the default window,
    /// so no call waits on the network.
    auto: bool,
    window: Option<usize>,
    faults: Faults,
    /// Drops on one link end only, (endpoint, link), instead of everywhere.
    drop_on: Option<(usize, usize)>,
    kill: Kill,
    /// Driver steps before the kill.
    kill_at: u64,
}

impl Plan {
    fn new(seed: u64) -> Plan {
        let mut r = Rng(seed);
        let (m, n) = (1 + r.below(4) as u32, 1 + r.below(4) as u32);
        let auto = r.percent(40);
        let delay_ns = r.pick(&[0, 100, 1_000, 20_000]);
        let jitter_ns = r.pick(&[0, 0, 5_000, 50_000]);
        let sent_delay_ns = match (auto, r.below(3)) {
            (_, 0) => None,
            // Early: before the landing.
            (_, 1) => Some(r.below(delay_ns + 1)),
            // Late: possibly well after the landing and the answer.
            (true, _) => Some(r.below(2 * (delay_ns + jitter_ns) + 100_000)),
            (false, _) => Some(delay_ns / 2),
        };
        let drop_per_million = if r.percent(20) {
            r.pick(&[1_000, 50_000, 300_000, 1_000_000])
        } else {
            0
        };
        let duplicate_per_million = if r.percent(30) {
            r.pick(&[10_000, 200_000, 1_000_000])
        } else {
            0
        };
        // A duplicate lands with its original (no jitter): a copy landing
        // after the slot was reused writes stale bytes under a batch that
        // was already accepted, which the slot protocol cannot see. No
        // real backend replays a write after a later one completed; the
        // sim can (AFMESH_SEED=89 with jitter kept shows it).
        let jitter_ns = if duplicate_per_million > 0 {
            0
        } else {
            jitter_ns
        };
        // In step mode a duplicate can land after the answer it copies was
        // taken; a `Sent` that waits for it would hold the next use of the
        // slot, which nothing delivers while the driver is inside that
        // call. So step mode duplicates only with an early `Sent`.
        let sent_delay_ns = if !auto && duplicate_per_million > 0 {
            Some(sent_delay_ns.unwrap_or(0).min(delay_ns))
        } else {
            sent_delay_ns
        };
        let faults = Faults {
            delay_ns,
            jitter_ns,
            drop_per_million,
            duplicate_per_million,
            sent_delay_ns,
            // Corruption is caught only with checksums on (tests/sim_checksums.rs).
            corrupt_per_million: 0,
        };
        let drop_on = (drop_per_million > 0 && r.percent(50)).then(|| {
            // Either end of a random (attention, FFN) link.
            let (a, f) = (
                r.below(u64::from(m)) as usize,
                r.below(u64::from(n)) as usize,
            );
            if r.percent(50) {
                (a, f)
            } else {
                (m as usize + f, a)
            }
        });
        let kill = match r.below(10) {
            0 | 1 => Kill::Link {
                a: r.below(u64::from(m)) as u32,
                f: r.below(u64::from(n)) as u32,
            },
            2 => Kill::Attention(r.below(u64::from(m)) as u32),
            3 => Kill::Ffn(r.below(u64::from(n)) as u32),
            _ => Kill::None,
        };
        Plan {
            m,
            n,
            stages: 1 + r.below(3) as u32,
            max_tokens: 1 + r.below(9) as u32,
            layers: 1 + r.below(6) as u32,
            auto,
            window: (auto && r.percent(50)).then(|| 1 + r.below(4) as usize),
            faults,
            drop_on,
            kill,
            kill_at: r.below(300),
        }
    }

    fn lossy(&self) -> bool {
        self.faults.drop_per_million > 0
    }

    /// The peers across a dead link of `me`.
    fn dead_peers(&self, me: Peer) -> Vec<Peer> {
        match (self.kill, me) {
            (Kill::Link { a, f }, Peer::Attention(i)) if a == i => vec![Peer::Ffn(f)],
            (Kill::Link { a, f }, Peer::Ffn(j)) if f == j => vec![Peer::Attention(a)],
            (Kill::Attention(a), Peer::Attention(i)) if a == i => {
                (0..self.n).map(Peer::Ffn).collect()
            }
            (Kill::Attention(a), Peer::Ffn(_)) => vec![Peer::Attention(a)],
            (Kill::Ffn(f), Peer::Ffn(j)) if f == j => (0..self.m).map(Peer::Attention).collect(),
            (Kill::Ffn(f), Peer::Attention(_)) => vec![Peer::Ffn(f)],
            _ => Vec::new(),
        }
    }

    fn apply_kill(&self, net: &SimNetwork) {
        // Endpoints: A0..A(M-1), then F0..F(N-1); at A_i link j leads to
        // F_j, at F_j link i to A_i.
        match self.kill {
            Kill::None => {}
            Kill::Link { a, f } => net.kill_link(a as usize, f as usize),
            Kill::Attention(a) => net.kill_endpoint(a as usize),
            Kill::Ffn(f) => net.kill_endpoint((self.m + f) as usize),
        }
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            stages: self.stages,
            max_tokens: self.max_tokens,
            row_bytes: ROW,
            out_row_bytes: OUT_ROW,
            side_bytes: SIDE,
        }
    }
}

fn token_count(seed: u64, a: u32, layer: u32, stage: u32, max: u32) -> u32 {
    (mix(seed ^ (u64::from(a) << 40) ^ (u64::from(layer) << 20) ^ u64::from(stage))
        % u64::from(max + 1)) as u32
}

fn tokens_for(a: u32, layer: u32, stage: u32, count: u32) -> Vec<u8> {
    (0..count as usize)
        .flat_map(|r| {
            (0..ROW as usize).map(move |k| {
                (mix((u64::from(a) << 48)
                    ^ (u64::from(layer) << 24)
                    ^ (u64::from(stage) << 16)
                    ^ r as u64) as usize
                    + k) as u8
            })
        })
        .collect()
}

fn side_for(a: u32, layer: u32) -> [u8; 8] {
    let mut s = [0u8; 8];
    s[..4].copy_from_slice(&layer.to_le_bytes());
    s[4..].copy_from_slice(&a.to_le_bytes());
    s
}

/// FFN rank `f`'s answer to rows `input`: a function of every input byte.
fn ffn_rows(input: &[u8], f: u32) -> Vec<u8> {
    input
        .chunks(ROW as usize)
        .flat_map(|row| {
            let h = row
                .iter()
                .fold(u64::from(f) + 1, |h, b| mix(h ^ u64::from(*b)));
            h.to_le_bytes()
        })
        .collect()
}

/// What one seed saw, for the campaign's coverage line.
#[derive(Debug, Default)]
struct Tally {
    combines: u64,
    batches: u64,
    peer_lost: u64,
    timeouts: u64,
    waits: u64,
}

/// Checks a failure `e` of rank `me`: the right kind, the peer named.
fn check_failure(plan: &Plan, me: Peer, e: &Error, tally: &mut Tally) {
    let dead = plan.dead_peers(me);
    match e {
        Error::PeerLost { peer, reason } => {
            assert!(
                dead.contains(peer),
                "{me}: PeerLost naming {peer} ({reason}), whose link to {me} is alive"
            );
            tally.peer_lost += 1;
        }
        Error::Timeout { peer, op, .. } => {
            assert!(
                dead.is_empty() || plan.lossy(),
                "{me}: {op} timed out naming {peer:?}, but {me} lost {dead:?} without drops: that is PeerLost"
            );
            assert!(!peer.is_empty(), "{me}: {op} timed out naming nobody");
            for name in peer.split(',') {
                let (role, idx) = name.split_at(1);
                let idx: u32 = idx
                    .parse()
                    .unwrap_or_else(|_| panic!("{me}: timeout names {name:?} in {peer:?}"));
                match (me, role) {
                    (Peer::Attention(_), "F") => assert!(idx < plan.n, "{me}: {peer}"),
                    (Peer::Ffn(_), "A") => assert!(idx < plan.m, "{me}: {peer}"),
                    _ => panic!("{me}: {op} timeout names {name} in {peer:?}"),
                }
            }
            tally.timeouts += 1;
        }
        other => panic!("{me}: failed with {other:?}, not PeerLost or Timeout"),
    }
}

/// Checks a combine's partials against what every FFN rank must answer.
fn check_partials(me: u32, n: usize, c: &afmesh::Combined<'_>, layer: u32, stage: u32, count: u32) {
    let rows = tokens_for(me, layer, stage, count);
    assert_eq!(
        c.tokens(),
        count as usize,
        "A{me} layer {layer} stage {stage}"
    );
    for f in 0..n {
        assert_eq!(
            c.partial(f).unwrap(),
            &ffn_rows(&rows, f as u32)[..],
            "A{me} layer {layer} stage {stage}: partial of F{f} corrupted"
        );
    }
}

/// Serves every complete batch on `f`, checking every input byte.
fn serve(f: &mut FfnRank, tally: &mut Tally) -> Result<usize, Error> {
    let mut served = 0;
    let me = f.rank();
    while let Some(b) = f.try_get_batch()? {
        for a in 0..b.senders() {
            let side = b.side(a);
            assert_eq!(side.len(), SIDE as usize, "F{me}: side of A{a}");
            let layer = u32::from_le_bytes(side[..4].try_into().unwrap());
            assert_eq!(&side[4..], &(a as u32).to_le_bytes(), "F{me}: side of A{a}");
            let count = b.token_count(a) as u32;
            assert_eq!(
                b.tokens(a),
                &tokens_for(a as u32, layer, b.stage(), count)[..],
                "F{me}: A{a}'s rows of layer {layer} stage {} corrupted",
                b.stage()
            );
        }
        let r = if b.sequence() % 2 == 1 {
            f.respond_with(b, |b, a, rows| {
                rows.copy_from_slice(&ffn_rows(b.tokens(a), me));
            })
        } else {
            let outs: Vec<Vec<u8>> = (0..b.senders())
                .map(|a| ffn_rows(b.tokens(a), me))
                .collect();
            let refs: Vec<&[u8]> = outs.iter().map(|v| &v[..]).collect();
            f.respond(b, &refs)
        };
        r.map_err(|e| e.error)?;
        tally.batches += 1;
        served += 1;
    }
    Ok(served)
}

fn dispatch(
    a: &mut AttentionRank,
    layer: u32,
    stage: u32,
    count: u32,
) -> Result<DispatchHandle, Error> {
    let me = a.rank();
    let tokens = tokens_for(me, layer, stage, count);
    let side = side_for(me, layer);
    if (layer + stage).is_multiple_of(2) {
        return a.dispatch(stage, &tokens, &side);
    }
    a.dispatch_with(stage, count as usize, |rows, area| {
        rows.copy_from_slice(&tokens);
        area[..side.len()].copy_from_slice(&side);
        side.len()
    })
}

/// Times a call that must not block.
fn quick<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    assert!(t.elapsed() < STUCK, "{what} took {:?}", t.elapsed());
    r
}

/// Runs one seed; panics on a broken invariant.
fn run_seed(seed: u64, tally: &mut Tally) {
    let plan = Plan::new(seed);
    let net = SimNetwork::new(seed);
    let (mut attn, mut ffn) = sim_mesh(&net, plan.m, plan.n, plan.spec()).unwrap();
    net.set_auto(plan.auto);
    if let Some(w) = plan.window {
        net.set_window(w);
    }
    match plan.drop_on {
        None => net.set_faults_everywhere(plan.faults),
        Some((ep, link)) => {
            net.set_faults_everywhere(Faults {
                drop_per_million: 0,
                ..plan.faults
            });
            net.set_faults(ep, link, plan.faults);
        }
    }
    let (m, n, stages) = (plan.m as usize, plan.n, plan.stages as usize);
    let mut next_layer = vec![vec![0u32; stages]; m];
    let mut inflight: Vec<Vec<Option<(DispatchHandle, u32, u32)>>> = vec![vec![None; stages]; m];
    let mut a_failed: Vec<Option<Error>> = (0..m).map(|_| None).collect();
    let mut f_failed: Vec<Option<Error>> = (0..n).map(|_| None).collect();
    let total = plan.m * plan.stages * plan.layers;
    let (mut done, mut steps, mut killed) = (0u32, 0u64, false);
    loop {
        if !killed && steps >= plan.kill_at {
            plan.apply_kill(&net);
            killed = true;
        }
        let mut progressed = false;
        for (ai, a) in attn.iter_mut().enumerate() {
            if a_failed[ai].is_some() {
                continue;
            }
            for s in 0..stages {
                let r = match inflight[ai][s] {
                    None if next_layer[ai][s] < plan.layers => {
                        let l = next_layer[ai][s];
                        let count = token_count(seed, ai as u32, l, s as u32, plan.max_tokens);
                        quick("dispatch", || dispatch(a, l, s as u32, count)).map(|h| {
                            inflight[ai][s] = Some((h, l, count));
                            next_layer[ai][s] += 1;
                            progressed = true;
                        })
                    }
                    Some((h, l, count)) => quick("try_combine", || match a.try_combine(h) {
                        Ok(Some(c)) => {
                            check_partials(ai as u32, n as usize, &c, l, s as u32, count);
                            Ok(true)
                        }
                        Ok(None) => Ok(false),
                        Err(e) => Err(e),
                    })
                    .map(|got| {
                        if got {
                            inflight[ai][s] = None;
                            done += 1;
                            tally.combines += 1;
                            progressed = true;
                        }
                    }),
                    None => Ok(()),
                };
                if let Err(e) = r {
                    a_failed[ai] = Some(e);
                    break;
                }
            }
        }
        for (fi, f) in ffn.iter_mut().enumerate() {
            if f_failed[fi].is_some() {
                continue;
            }
            match quick("serve", || serve(f, tally)) {
                Ok(k) => progressed |= k > 0,
                Err(e) => f_failed[fi] = Some(e),
            }
        }
        if done == total && killed {
            break;
        }
        if !progressed && !net.step() {
            if killed {
                break;
            }
            // Quiet before the kill: kill now, and go on.
            steps = plan.kill_at;
            continue;
        }
        steps += 1;
        assert!(steps < 1_000_000, "runaway");
    }
    if plan.kill == Kill::None && !plan.lossy() {
        assert_eq!(
            done, total,
            "without drops or deaths every combine completes"
        );
    }
    // The mesh is quiet: every wait still open either completes from what
    // already landed or fails, within its timeout, naming the peer.
    for (ai, a) in attn.iter_mut().enumerate() {
        if a_failed[ai].is_some() {
            continue;
        }
        for (s, open) in inflight[ai].iter_mut().enumerate() {
            let Some((h, l, count)) = *open else {
                continue;
            };
            let t = Instant::now();
            let r = a.wait_combine(h, WAIT);
            let took = t.elapsed();
            tally.waits += 1;
            assert!(
                took <= WAIT + MARGIN,
                "A{ai}: wait_combine({WAIT:?}) took {took:?}"
            );
            match r {
                Ok(c) => {
                    check_partials(ai as u32, n as usize, &c, l, s as u32, count);
                    *open = None;
                    tally.combines += 1;
                }
                Err(e) => {
                    a_failed[ai] = Some(e);
                    break;
                }
            }
        }
    }
    for (fi, f) in ffn.iter_mut().enumerate() {
        if f_failed[fi].is_some() {
            continue;
        }
        let t = Instant::now();
        let r = f.get_batch(WAIT);
        let took = t.elapsed();
        tally.waits += 1;
        assert!(
            took <= WAIT + MARGIN,
            "F{fi}: get_batch({WAIT:?}) took {took:?}"
        );
        match r {
            Ok(b) => panic!(
                "F{fi}: a batch of stage {} was ready after the mesh went quiet",
                b.stage()
            ),
            Err(e) => f_failed[fi] = Some(e),
        }
    }
    for (ai, e) in a_failed.iter().enumerate() {
        let me = Peer::Attention(ai as u32);
        match e {
            Some(e) => check_failure(&plan, me, e, tally),
            None => assert!(
                inflight[ai].iter().all(Option::is_none) || !plan.dead_peers(me).is_empty(),
                "{me}: a wait still open and no failure"
            ),
        }
    }
    for (fi, e) in f_failed.iter().enumerate() {
        let me = Peer::Ffn(fi as u32);
        let e = e.as_ref().unwrap();
        // Told of its own dead links, unless drops may explain the silence.
        if !plan.dead_peers(me).is_empty() && !plan.lossy() {
            assert!(
                matches!(e, Error::PeerLost { .. }),
                "{me}: {e:?}, not PeerLost"
            );
        }
        check_failure(&plan, me, e, tally);
    }
}

fn run_one(seed: u64, tally: &mut Tally) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(seed, tally)));
    if let Err(p) = r {
        eprintln!(
            "campaign: seed {seed} failed ({:?}); replay with AFMESH_SEED={seed} cargo test --test campaign",
            Plan::new(seed)
        );
        std::panic::resume_unwind(p);
    }
}

#[test]
fn random_meshes_under_random_faults_keep_the_invariants() {
    let mut tally = Tally::default();
    if let Some(seed) = std::env::var("AFMESH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_one(seed, &mut tally);
        eprintln!("campaign: seed {seed}: {tally:?}");
        return;
    }
    let budget = Duration::from_secs(
        std::env::var("AFMESH_CAMPAIGN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let first: u64 = std::env::var("AFMESH_SEED_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let start = Instant::now();
    let mut seeds = 0u64;
    while start.elapsed() < budget || seeds < 20 {
        run_one(first + seeds, &mut tally);
        seeds += 1;
    }
    eprintln!(
        "campaign: {seeds} seeds in {:?}: {tally:?}",
        start.elapsed()
    );
    // The campaign saw what it is for: data checked, and failures of both
    // kinds reported and checked.
    assert!(tally.combines > 0 && tally.batches > 0, "{tally:?}");
    if seeds >= 100 {
        assert!(tally.peer_lost > 0 && tally.timeouts > 0, "{tally:?}");
    }
}
