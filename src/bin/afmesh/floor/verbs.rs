//! The plain-verbs exchange floor: M+N processes, one RC QP per pair, one
//! signalled write-with-imm per stage message each way, CQs busy-polled
//! (see `afmesh::transport::verbs::plain`). The bench relays each side's
//! QP description to the other through the processes' stdin and stdout.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use afmesh::transport::verbs::plain::{Event, PlainEndpoint};
use afmesh::Histogram;
use anyhow::{bail, Context, Result};

use super::{parts, PeerArgs, PeerRole, Plan, Waiter};
use crate::bench::{lat_of, wait_all, words_json, Children};

/// What the verbs floor measured.
#[derive(Debug)]
pub struct VerbsFloor {
    pub lat: Histogram,
    pub port_gbps: f64,
    pub device: String,
}

struct Peer {
    lines: mpsc::Receiver<String>,
    stdin: ChildStdin,
}

fn next_line(p: &Peer, plan: &Plan, who: &str) -> Result<String> {
    p.lines
        .recv_timeout(plan.timeout)
        .with_context(|| format!("verbs floor {who} said nothing within {:?}", plan.timeout))
}

/// Runs the floor's processes and collects the attention side's layers.
pub fn run(plan: &Plan) -> Result<VerbsFloor> {
    let deadline = Instant::now() + plan.budget();
    let mut children = Children(Vec::new());
    let mut peers: Vec<Peer> = Vec::new();
    let mut outs: Vec<mpsc::Receiver<String>> = Vec::new();
    let mut infos: Vec<Vec<String>> = Vec::new();
    for (role, count) in [("ffn", plan.n), ("attention", plan.m)] {
        let others = if role == "ffn" { plan.m } else { plan.n };
        for r in 0..count {
            let mut cmd = plan.command("verbs", role, r)?;
            cmd.stdin(Stdio::piped());
            let child = children.spawn(format!("verbs floor {role} {r}"), &mut cmd)?;
            let out = child.stdout.take().context("no stdout")?;
            let stdin = child.stdin.take().context("no stdin")?;
            let (tx, rx) = mpsc::channel();
            let (ltx, lrx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                    if l.starts_with('{') {
                        let _ = ltx.send(l);
                    } else {
                        let _ = tx.send(l);
                    }
                }
            });
            let p = Peer { lines: rx, stdin };
            let who = format!("{role} {r}");
            let mut mine = Vec::new();
            for _ in 0..others {
                let l = next_line(&p, plan, &who)?;
                match l.strip_prefix("info ") {
                    Some(i) => mine.push(i.to_string()),
                    None => bail!("verbs floor {who}: {l}"),
                }
            }
            infos.push(mine);
            peers.push(p);
            outs.push(lrx);
        }
    }
    let n = plan.n as usize;
    // FFN f's QP a meets attention a's QP f.
    for (i, p) in peers.iter_mut().enumerate() {
        let lines: Vec<&String> = if i < n {
            (0..plan.m as usize).map(|a| &infos[n + a][i]).collect()
        } else {
            (0..n).map(|f| &infos[f][i - n]).collect()
        };
        for l in lines {
            writeln!(p.stdin, "{l}").context("verbs floor: relaying QP descriptions")?;
        }
    }
    for (i, p) in peers.iter().enumerate() {
        let l = next_line(p, plan, &format!("process {i}"))?;
        if l != "ready" {
            bail!("verbs floor process {i}: {l}");
        }
    }
    for p in &mut peers {
        writeln!(p.stdin, "go").context("verbs floor: starting")?;
    }
    let _ = wait_all(&mut children, deadline)?;
    let mut lat = Histogram::new();
    let mut port_gbps = 0.0;
    let mut device = String::new();
    for rx in outs.iter().skip(n) {
        let l = rx
            .try_recv()
            .context("verbs floor: an attention process reported nothing")?;
        lat.merge(&lat_of(&l).context("verbs floor report")?);
        port_gbps = crate::bench::field(&l, "port_gbps")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        device = crate::bench::field(&l, "device")
            .unwrap_or("")
            .trim_matches('"')
            .to_string();
    }
    Ok(VerbsFloor {
        lat,
        port_gbps,
        device,
    })
}

/// One process of the verbs floor.
pub fn peer(args: &PeerArgs) -> Result<()> {
    let (m, n) = (args.attention as usize, args.ffn as usize);
    let a_rank = args.rank as usize;
    let others = match args.role {
        PeerRole::Attention => n,
        PeerRole::Ffn => m,
    };
    // Buffers: FFN = [dispatch from A0 | A1 | ...][reply source];
    // attention = [combine from F0 | F1 | ...][dispatch source].
    let d_off: Vec<usize> = (0..m)
        .scan(0, |at, a| {
            let o = *at;
            *at += args.sizes(a).0;
            Some(o)
        })
        .collect();
    let d_total: usize = (0..m).map(|a| args.sizes(a).0).sum();
    let c_max = (0..m).map(|a| args.sizes(a).1).max().unwrap_or(0);
    let len = match args.role {
        PeerRole::Ffn => d_total + c_max,
        PeerRole::Attention => {
            let (d, c) = args.sizes(a_rank);
            n * c + d
        }
    };
    let recvs = args.stages as usize + 2;
    let mut ep = PlainEndpoint::new(len, others, recvs).context("plain verbs endpoint")?;
    for i in 0..others {
        println!("info {}", ep.info(i));
    }
    std::io::stdout().flush()?;
    let mut stdin = std::io::stdin().lock();
    for i in 0..others {
        let mut l = String::new();
        stdin.read_line(&mut l)?;
        ep.connect(i, l.trim())?;
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut go = String::new();
    stdin.read_line(&mut go)?;
    if go.trim() != "go" {
        bail!("verbs floor: expected go, got {go:?}");
    }
    let per_layer = args.stages as usize;
    let mut ev = Vec::with_capacity(64);
    match args.role {
        PeerRole::Attention => {
            let (d, c) = args.sizes(a_rank);
            let src = n * c;
            let ps = parts(d, args.stages);
            let mut lat = Histogram::new();
            for layer in 0..args.layers() {
                let t = Instant::now();
                for (k, &(at, l)) in ps.iter().enumerate() {
                    for f in 0..n {
                        ep.write(f, src + at, l, (d_off[a_rank] + at) as u64, k as u32)?;
                    }
                }
                let (mut sent, mut landed) = (0, 0);
                let mut w = Waiter::new(args.cpu.is_some(), args.timeout());
                while sent < n * per_layer || landed < n * per_layer {
                    ev.clear();
                    ep.poll(&mut ev)?;
                    if ev.is_empty() {
                        w.relax(|| format!("layer {layer}'s replies"))?;
                        continue;
                    }
                    w.progressed();
                    for e in &ev {
                        match *e {
                            Event::Sent { .. } => sent += 1,
                            Event::Landed { qp, .. } => {
                                landed += 1;
                                ep.post_recv(qp)?;
                            }
                        }
                    }
                }
                if layer >= args.warmup {
                    lat.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                }
            }
            println!(
                "{{\"lat_ns\":{},\"port_gbps\":{:.3},\"device\":\"{}\"}}",
                words_json(&lat),
                ep.port_gbps(),
                ep.device()
            );
        }
        PeerRole::Ffn => {
            let f = a_rank;
            let replies: Vec<Vec<(usize, usize)>> = (0..m)
                .map(|a| parts(args.sizes(a).1, args.stages))
                .collect();
            let total = m * per_layer * args.layers() as usize;
            let (mut sent, mut landed) = (0, 0);
            let mut w = Waiter::new(args.cpu.is_some(), args.timeout());
            while sent < total || landed < total {
                ev.clear();
                ep.poll(&mut ev)?;
                if ev.is_empty() {
                    w.relax(|| "the attention processes".to_string())?;
                    continue;
                }
                w.progressed();
                for e in &ev {
                    match *e {
                        Event::Sent { .. } => sent += 1,
                        Event::Landed { qp: a, imm } => {
                            landed += 1;
                            ep.post_recv(a)?;
                            let c = args.sizes(a).1;
                            let (at, l) = replies[a][imm as usize % per_layer];
                            ep.write(a, d_total + at, l, (f * c + at) as u64, imm)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
