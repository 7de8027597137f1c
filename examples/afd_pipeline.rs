//! A small attention–FFN disaggregated model, end to end across processes.
//!
//! M attention processes each hold a few tokens. Every layer, each one
//! projects its tokens, routes them to the top-k of E experts, and
//! dispatches the projected rows plus the routing (expert ids and weights)
//! to all N FFN processes. Each FFN process runs the experts it owns on the
//! rows routed to them and combines the weighted result back; the attention
//! side sums the N partials (the reduce-scatter) and adds the residual.
//!
//! The parent process runs the rendezvous server, spawns the M+N ranks,
//! collects each attention rank's final activations as a checksum, computes
//! the same model in one process, and exits non-zero if they differ.
//!
//! `cargo run --release --example afd_pipeline [-- M N LAYERS]`

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use afmesh::bootstrap::{Scheduler, SchedulerConfig};
use afmesh::{Dtype, Mesh, MeshConfig, StageSpec};
use anyhow::{bail, Context, Result};

const HIDDEN: usize = 64;
const FF: usize = 32;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;
const MAX_TOKENS: usize = 16;
const STAGES: u32 = 1;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Deterministic weights in [-0.5, 0.5).
fn weight(tag: u64, i: usize, j: usize) -> f32 {
    let mut x = tag
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((i as u64) << 32 | j as u64);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

fn tokens_of(a: usize) -> usize {
    MAX_TOKENS - (a * 5) % MAX_TOKENS
}

fn initial(a: usize) -> Vec<f32> {
    (0..tokens_of(a) * HIDDEN)
        .map(|i| weight(1000 + a as u64, i / HIDDEN, i % HIDDEN))
        .collect()
}

/// Attention's per-layer work: h = tanh(x·Wa), then routing.
fn project(layer: usize, x: &[f32]) -> (Vec<f32>, Vec<u8>) {
    let t = x.len() / HIDDEN;
    let mut h = vec![0f32; x.len()];
    let mut side = Vec::with_capacity(t * TOP_K * 8);
    for r in 0..t {
        let xr = &x[r * HIDDEN..(r + 1) * HIDDEN];
        for c in 0..HIDDEN {
            let mut s = 0f32;
            for (k, xv) in xr.iter().enumerate() {
                s += xv * weight(10 + layer as u64, k, c);
            }
            h[r * HIDDEN + c] = s.tanh();
        }
        let hr = &h[r * HIDDEN..(r + 1) * HIDDEN];
        let logits: Vec<f32> = (0..EXPERTS)
            .map(|e| {
                hr.iter()
                    .enumerate()
                    .map(|(k, v)| v * weight(20 + layer as u64, k, e))
                    .sum()
            })
            .collect();
        let mut order: Vec<usize> = (0..EXPERTS).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let top = &order[..TOP_K];
        let mx = logits[top[0]];
        let z: f32 = top.iter().map(|&e| (logits[e] - mx).exp()).sum();
        for &e in top {
            side.extend_from_slice(&(e as u32).to_le_bytes());
            side.extend_from_slice(&((logits[e] - mx).exp() / z).to_le_bytes());
        }
    }
    (h, side)
}

/// FFN rank `f`'s partial for one token: its local experts among the
/// token's top-k, weighted.
fn ffn_partial(layer: usize, f: usize, n: usize, h: &[f32], routing: &[u8], out: &mut [f32]) {
    out.iter_mut().for_each(|o| *o = 0.0);
    for k in 0..TOP_K {
        let e = u32::from_le_bytes(routing[k * 8..k * 8 + 4].try_into().unwrap_or([0; 4])) as usize;
        let w = f32::from_le_bytes(routing[k * 8 + 4..k * 8 + 8].try_into().unwrap_or([0; 4]));
        if e >= EXPERTS || e % n != f {
            continue;
        }
        let tag = 100 + (layer * EXPERTS + e) as u64 * 2;
        let mid: Vec<f32> = (0..FF)
            .map(|j| {
                h.iter()
                    .enumerate()
                    .map(|(i, v)| v * weight(tag, i, j))
                    .sum::<f32>()
                    .max(0.0)
            })
            .collect();
        for (c, o) in out.iter_mut().enumerate() {
            *o += w * mid
                .iter()
                .enumerate()
                .map(|(j, m)| m * weight(tag + 1, j, c))
                .sum::<f32>();
        }
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn checksum(x: &[f32]) -> u64 {
    x.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3)
    })
}

fn spec() -> StageSpec {
    StageSpec {
        stages: STAGES,
        max_tokens: MAX_TOKENS as u32,
        row_bytes: (HIDDEN * 4) as u32,
        out_row_bytes: (HIDDEN * 4) as u32,
        side_bytes: (MAX_TOKENS * TOP_K * 8) as u32,
    }
}

fn attention_rank(cfg: MeshConfig, layers: usize) -> Result<()> {
    let mut a = Mesh::new(cfg).attention(spec())?;
    let me = a.rank() as usize;
    let mut x = initial(me);
    let mut sum = vec![0u8; x.len() * 4];
    for layer in 0..layers {
        let (h, side) = project(layer, &x);
        let handle = a.dispatch(0, &bytes(&h), &side)?;
        a.wait_combine_sum(handle, Dtype::F32, &mut sum, TIMEOUT)?;
        for (xv, y) in x.iter_mut().zip(f32s(&sum)) {
            *xv += y;
        }
    }
    println!("checksum {me} {:016x}", checksum(&x));
    a.shutdown()?;
    Ok(())
}

fn ffn_rank(cfg: MeshConfig, layers: usize) -> Result<()> {
    let mut f = Mesh::new(cfg).ffn(spec())?;
    let (me, n) = (f.rank() as usize, f.ffn_ranks());
    for layer in 0..layers {
        let b = f.get_batch(TIMEOUT)?;
        let mut outs = Vec::with_capacity(b.senders());
        for a in 0..b.senders() {
            let h = f32s(b.tokens(a));
            let side = b.side(a);
            let mut out = vec![0f32; h.len()];
            for r in 0..b.token_count(a) {
                ffn_partial(
                    layer,
                    me,
                    n,
                    &h[r * HIDDEN..(r + 1) * HIDDEN],
                    &side[r * TOP_K * 8..(r + 1) * TOP_K * 8],
                    &mut out[r * HIDDEN..(r + 1) * HIDDEN],
                );
            }
            outs.push(bytes(&out));
        }
        let refs: Vec<&[u8]> = outs.iter().map(|o| &o[..]).collect();
        f.respond(b, &refs)?;
    }
    f.shutdown()?;
    Ok(())
}

/// The same model in one process, summing partials in FFN-rank order as
/// the attention rank does.
fn reference(m: usize, n: usize, layers: usize) -> Vec<u64> {
    (0..m)
        .map(|a| {
            let mut x = initial(a);
            for layer in 0..layers {
                let (h, side) = project(layer, &x);
                for r in 0..tokens_of(a) {
                    let mut acc = [0f32; HIDDEN];
                    let mut part = [0f32; HIDDEN];
                    for f in 0..n {
                        ffn_partial(
                            layer,
                            f,
                            n,
                            &h[r * HIDDEN..(r + 1) * HIDDEN],
                            &side[r * TOP_K * 8..(r + 1) * TOP_K * 8],
                            &mut part,
                        );
                        for (s, p) in acc.iter_mut().zip(part) {
                            *s += p;
                        }
                    }
                    for (xv, s) in x[r * HIDDEN..(r + 1) * HIDDEN].iter_mut().zip(acc) {
                        *xv += s;
                    }
                }
            }
            checksum(&x)
        })
        .collect()
}

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (m, n, layers) = (
        *args.first().unwrap_or(&2),
        *args.get(1).unwrap_or(&2),
        *args.get(2).unwrap_or(&6),
    );
    if let Ok(role) = std::env::var("AFD_ROLE") {
        let cfg = MeshConfig::from_env()?;
        return match role.as_str() {
            "attention" => attention_rank(cfg, layers),
            _ => ffn_rank(cfg, layers),
        };
    }
    if m == 0 || n == 0 || n > EXPERTS {
        bail!("need M >= 1 and 1 <= N <= {EXPERTS}");
    }
    let sched = Scheduler::bind("127.0.0.1:0", SchedulerConfig::default())?.spawn()?;
    let exe = std::env::current_exe()?;
    let mut kids = Kill(Vec::new());
    for (role, count) in [("ffn", n), ("attention", m)] {
        for r in 0..count {
            let c = Command::new(&exe)
                .args([m.to_string(), n.to_string(), layers.to_string()])
                .env("AFD_ROLE", role)
                .env("AFMESH_ROLE", role)
                .env("AFMESH_RANK", r.to_string())
                .env("AFMESH_SCHEDULER", sched.addr().to_string())
                .env("AFMESH_NUM_ATTENTION", m.to_string())
                .env("AFMESH_NUM_FFN", n.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("spawning {role} {r}"))?;
            kids.0.push(c);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = vec![None; m];
    for c in &mut kids.0 {
        let st = loop {
            if let Some(st) = c.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                bail!("ranks did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut out = String::new();
        if let Some(mut s) = c.stdout.take() {
            std::io::Read::read_to_string(&mut s, &mut out)?;
        }
        if !st.success() {
            bail!("a rank failed ({st})");
        }
        for line in out.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let ["checksum", r, h] = w[..] {
                got[r.parse::<usize>()?] = Some(u64::from_str_radix(h, 16)?);
            }
        }
    }
    let _ = sched.join();
    let want = reference(m, n, layers);
    let dist: Vec<u64> = got.iter().map(|g| g.unwrap_or(0)).collect();
    let combine = |v: &[u64]| v.iter().fold(0u64, |h, x| h.rotate_left(13) ^ x);
    println!("{m}A x {n}F, {layers} layers, {EXPERTS} experts top-{TOP_K}, hidden {HIDDEN}");
    println!("checksum (distributed) {:016x}", combine(&dist));
    println!("checksum (reference)   {:016x}", combine(&want));
    if got.iter().any(Option::is_none) || dist != want {
        bail!("MISMATCH: per-rank distributed {dist:x?} vs reference {want:x?}");
    }
    println!("match");
    Ok(())
}
