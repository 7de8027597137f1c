//! The synthetic, self-checking AFD layer that `afmesh run` and `afmesh
//! bench` execute. Every token row carries an 8-byte stamp naming (layer,
//! stage, attention rank, row); the FFN answers each row with its stamp
//! mixed with its own rank, over a body pattern of its own. The attention
//! rank checks every byte of every partial it gets back.
//!
//! Both sides build their messages in place in the send slots
//! (`dispatch_with`, `respond_with`), as an engine that computes straight
//! into registered memory would: no copy is made on the way out. A slot
//! keeps its bytes between uses, so a row's body is written once and only
//! its stamp is rewritten per layer.

use std::time::{Duration, Instant};

use afmesh::transport::Gaps;
use afmesh::{AttentionRank, FfnRank, Histogram, Mesh, MeshConfig, StageSpec};
use anyhow::{bail, Context, Result};

/// Element type on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Elem {
    /// 1 byte.
    Fp8,
    /// 2 bytes.
    Bf16,
    /// 4 bytes.
    F32,
}

impl Elem {
    pub fn size(self) -> u32 {
        match self {
            Elem::Fp8 => 1,
            Elem::Bf16 => 2,
            Elem::F32 => 4,
        }
    }
}

pub const SIDE_BYTES: u32 = 16;

#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub tokens: u32,
    pub hidden: u32,
    pub dispatch: Elem,
    pub combine: Elem,
    pub stages: u32,
    pub warmup: u32,
    pub iters: u32,
    pub vary_tokens: bool,
    pub timeout: Duration,
}

impl Workload {
    pub fn spec(&self) -> Result<StageSpec> {
        let row = self
            .hidden
            .checked_mul(self.dispatch.size())
            .context("hidden too large")?;
        let out = self
            .hidden
            .checked_mul(self.combine.size())
            .context("hidden too large")?;
        if row < 8 || out < 8 {
            bail!(
                "--hidden {} gives rows of {row}/{out} bytes; the self-check needs at least 8",
                self.hidden
            );
        }
        if self.warmup.checked_add(self.iters).is_none() {
            bail!(
                "--warmup {} + --iters {} overflows a layer count ({} at most)",
                self.warmup,
                self.iters,
                u32::MAX
            );
        }
        Ok(StageSpec {
            stages: self.stages,
            max_tokens: self.tokens,
            row_bytes: row,
            out_row_bytes: out,
            side_bytes: SIDE_BYTES,
        })
    }

    /// Refuses, up front and naming the flags, a mesh of M×N whose slots
    /// one rank could not hold: about twice its receive region (the send
    /// slots and the expected bytes are of the same order) against this
    /// host's memory.
    pub fn check_memory(&self, m: u32, n: u32) -> Result<()> {
        let spec = self.spec()?;
        let mesh = Mesh::new(MeshConfig::new("unused:0", m, n));
        let recv = mesh
            .attention_memory_len(spec)?
            .max(mesh.ffn_memory_len(spec)?) as u64;
        let need = recv.saturating_mul(2);
        if let Some(have) = host_memory() {
            if need > have {
                bail!(
                    "--tokens {} × --hidden {} × --stages {} on {m}A+{n}F needs about {} MiB per rank; this host has {} MiB",
                    self.tokens,
                    self.hidden,
                    self.stages,
                    need >> 20,
                    have >> 20
                );
            }
        }
        Ok(())
    }

    pub fn layers(&self) -> u32 {
        self.warmup + self.iters
    }

    /// Batches an FFN rank takes before the timed layers begin.
    pub fn timed_batches_from(&self) -> u64 {
        u64::from(self.warmup) * u64::from(self.stages)
    }

    pub fn count(&self, layer: u32, stage: u32, a: u32) -> u32 {
        if self.vary_tokens {
            (mix(0x70c0 ^ (u64::from(layer) << 32) ^ (u64::from(stage) << 16) ^ u64::from(a))
                % (u64::from(self.tokens) + 1)) as u32
        } else {
            self.tokens
        }
    }

    /// Bytes one layer moves: (dispatch, combine), headers included.
    pub fn layer_bytes(&self, m: u32, n: u32) -> (u64, u64) {
        let spec = match self.spec() {
            Ok(s) => s,
            Err(_) => return (0, 0),
        };
        let (mut d, mut c) = (0u64, 0u64);
        for s in 0..self.stages {
            for a in 0..m {
                let t = u64::from(self.count(self.warmup, s, a));
                d += u64::from(n) * (64 + t * u64::from(spec.row_bytes) + u64::from(SIDE_BYTES));
                c += u64::from(n) * (64 + t * u64::from(spec.out_row_bytes));
            }
        }
        (d, c)
    }
}

/// This host's memory in bytes (`MemTotal`), if /proc says.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn stamp(layer: u32, stage: u32, a: u32, r: usize) -> u64 {
    mix((u64::from(layer) << 40) ^ (u64::from(stage) << 32) ^ (u64::from(a) << 20) ^ r as u64)
}

fn ffn_key(f: u32) -> u64 {
    mix(0xf00d ^ u64::from(f + 1))
}

fn in_body(a: u32, r: usize, k: usize) -> u8 {
    (r * 131 + k * 7 + a as usize * 17) as u8
}

fn out_body(f: u32, r: usize, k: usize) -> u8 {
    (r * 29 + k * 3 + f as usize * 101) as u8
}

/// What one attention rank measured.
#[derive(Debug)]
pub struct AttentionReport {
    /// Nanoseconds per timed layer, dispatch of the first stage to the
    /// last combine: fixed memory however long the run.
    pub lat: Histogram,
    pub errors: u64,
    pub first_error: Option<String>,
    pub ffn_us: f64,
    pub net_us: f64,
    /// The rank's spin gaps when the timed layers began.
    pub timed_from: Gaps,
}

pub fn run_attention(a: &mut AttentionRank, w: &Workload) -> Result<AttentionReport> {
    let spec = a.spec();
    let me = a.rank();
    let n = a.ffn_ranks() as u32;
    let row = spec.row_bytes as usize;
    let out_row = spec.out_row_bytes as usize;
    let max = w.tokens as usize;
    // Rows of each stage's send slot whose body is already written.
    let mut filled = vec![0usize; w.stages as usize];
    let expect_body: Vec<Vec<u8>> = (0..n)
        .map(|f| {
            (0..max * out_row)
                .map(|i| out_body(f, i / out_row, i % out_row))
                .collect()
        })
        .collect();
    let mut rep = AttentionReport {
        lat: Histogram::new(),
        errors: 0,
        first_error: None,
        ffn_us: 0.0,
        net_us: 0.0,
        timed_from: Gaps::default(),
    };
    let mut handles = Vec::with_capacity(w.stages as usize);
    let mut traces = 0u64;
    for layer in 0..w.layers() {
        if layer == w.warmup {
            rep.timed_from = a.stats().spin_gaps;
        }
        handles.clear();
        let t0 = Instant::now();
        for s in 0..w.stages {
            let count = w.count(layer, s, me) as usize;
            let done = &mut filled[s as usize];
            let h = a.dispatch_with(s, count, |rows, side| {
                for r in 0..count {
                    let rw = &mut rows[r * row..(r + 1) * row];
                    rw[..8].copy_from_slice(&stamp(layer, s, me, r).to_le_bytes());
                    if r >= *done {
                        for (k, b) in rw.iter_mut().enumerate().skip(8) {
                            *b = in_body(me, r, k);
                        }
                    }
                }
                *done = (*done).max(count);
                side[0..4].copy_from_slice(&layer.to_le_bytes());
                side[4..8].copy_from_slice(&s.to_le_bytes());
                side[8..12].copy_from_slice(&me.to_le_bytes());
                side[12..16].copy_from_slice(&(count as u32).to_le_bytes());
                SIDE_BYTES as usize
            });
            handles.push(h.with_context(|| format!("A{me}: dispatch layer {layer} stage {s}"))?);
        }
        a.wait_all(&handles, w.timeout)
            .with_context(|| format!("A{me}: combine of layer {layer}"))?;
        let dt = t0.elapsed();
        if layer >= w.warmup {
            rep.lat
                .record(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX));
        }
        for (s, h) in handles.iter().enumerate() {
            let c = a.wait_combine(*h, Duration::ZERO)?;
            let count = w.count(layer, s as u32, me) as usize;
            let mut bad = |what: String| {
                rep.errors += 1;
                rep.first_error.get_or_insert(what);
            };
            if c.tokens() != count {
                bad(format!(
                    "layer {layer} stage {s}: {} tokens back, sent {count}",
                    c.tokens()
                ));
                continue;
            }
            for f in 0..n {
                let p = c.partial(f as usize).unwrap_or(&[]);
                if p.len() != count * out_row {
                    bad(format!("layer {layer} stage {s} F{f}: {} bytes", p.len()));
                    continue;
                }
                for r in 0..count {
                    let got = &p[r * out_row..(r + 1) * out_row];
                    let want = stamp(layer, s as u32, me, r) ^ ffn_key(f);
                    if got[..8] != want.to_le_bytes()
                        || got[8..] != expect_body[f as usize][r * out_row + 8..(r + 1) * out_row]
                    {
                        bad(format!("layer {layer} stage {s} F{f} row {r}: wrong bytes"));
                        break;
                    }
                }
                if layer >= w.warmup {
                    if let Some(t) = c.trace(f as usize) {
                        rep.ffn_us += t.ffn_ns() as f64 / 1e3;
                        rep.net_us += t.network_ns() as f64 / 1e3;
                        traces += 1;
                    }
                }
            }
        }
    }
    if traces > 0 {
        rep.ffn_us /= traces as f64;
        rep.net_us /= traces as f64;
    }
    Ok(rep)
}

/// What one FFN rank saw.
#[derive(Debug)]
pub struct FfnReport {
    pub batches: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// The rank's spin gaps when the timed layers' batches began.
    pub timed_from: Gaps,
}

pub fn run_ffn(f: &mut FfnRank, w: &Workload) -> Result<FfnReport> {
    let spec = f.spec();
    let me = f.rank();
    let m = f.attention_ranks();
    let row = spec.row_bytes as usize;
    let out_row = spec.out_row_bytes as usize;
    // Rows of each (stage, attention rank) send slot whose body is already
    // written.
    let mut filled = vec![0usize; w.stages as usize * m];
    let mut rep = FfnReport {
        batches: 0,
        errors: 0,
        first_error: None,
        timed_from: Gaps::default(),
    };
    let total = u64::from(w.layers()) * u64::from(w.stages);
    while rep.batches < total {
        if rep.batches == w.timed_batches_from() {
            rep.timed_from = f.stats().spin_gaps;
        }
        let b = f
            .get_batch(w.timeout)
            .with_context(|| format!("F{me}: get_batch {}", rep.batches))?;
        let s = b.stage();
        let mut bad = |what: String| {
            rep.errors += 1;
            rep.first_error.get_or_insert(what);
        };
        for a in 0..m {
            let side = b.side(a);
            let count = b.token_count(a);
            if side.len() != SIDE_BYTES as usize {
                bad(format!(
                    "stage {s} A{a}: side block of {} bytes",
                    side.len()
                ));
                continue;
            }
            let word =
                |i: usize| u32::from_le_bytes([side[i], side[i + 1], side[i + 2], side[i + 3]]);
            let (layer, stage, sender, tokens) = (word(0), word(4), word(8), word(12));
            if stage != s
                || sender != a as u32
                || tokens as usize != count
                || w.count(layer, s, a as u32) as usize != count
            {
                bad(format!("stage {s} A{a}: side block says layer {layer} stage {stage} A{sender} {tokens} tokens"));
                continue;
            }
            // Under the matrix layout the input is read from the stage's
            // one matrix, as a GEMM over all tokens would; in warm-up
            // layers it is checked against the sender's own view too.
            let input = match (b.matrix(), b.sender_rows(a)) {
                (Some(mx), Some(rows)) => {
                    let mine = mx.get(rows.start * row..rows.end * row).unwrap_or(&[]);
                    if layer < w.warmup && mine != b.tokens(a) {
                        bad(format!(
                            "layer {layer} stage {s} A{a}: the matrix's rows differ from the sender's view"
                        ));
                        continue;
                    }
                    mine
                }
                _ => b.tokens(a),
            };
            // Full input check during warm-up only; stamps always.
            let full = layer < w.warmup;
            for r in 0..count {
                let inrow = &input[r * row..(r + 1) * row];
                let st = stamp(layer, s, a as u32, r);
                if inrow[..8] != st.to_le_bytes()
                    || full && (8..row).any(|k| inrow[k] != in_body(a as u32, r, k))
                {
                    bad(format!(
                        "layer {layer} stage {s} A{a} row {r}: wrong input bytes"
                    ));
                }
            }
        }
        // Each answer row: the input stamp mixed with this rank's key, over
        // this rank's body.
        let filled = &mut filled[s as usize * m..(s as usize + 1) * m];
        f.respond_with(b, |b, a, rows| {
            let input = b.tokens(a);
            let count = b.token_count(a);
            for r in 0..count {
                let inrow = &input[r * row..(r + 1) * row];
                let v = u64::from_le_bytes(inrow[..8].try_into().unwrap_or([0; 8])) ^ ffn_key(me);
                let out = &mut rows[r * out_row..(r + 1) * out_row];
                out[..8].copy_from_slice(&v.to_le_bytes());
                if r >= filled[a] {
                    for (k, o) in out.iter_mut().enumerate().skip(8) {
                        *o = out_body(me, r, k);
                    }
                }
            }
            filled[a] = filled[a].max(count);
        })
        .map_err(afmesh::Error::from)
        .with_context(|| format!("F{me}: respond stage {s}"))?;
        rep.batches += 1;
    }
    Ok(rep)
}
