//! `afmesh trace merge DIR -o job.json`: the per-rank traces of one job
//! (what `AFMESH_TRACE=DIR` or `afmesh bench --trace DIR` wrote) as one
//! Chrome/Perfetto trace on one clock.
//!
//! Each rank's file holds its stamps on its own wall clock and its offset
//! against the rendezvous server's clock with an error bound. The merge
//! puts every rank on the server's clock:
//!
//! 1. Ranks of one host share one wall clock, so they get one offset: the
//!    estimate with the smallest error bound among them.
//! 2. Where the messages themselves bound an FFN rank's offset more tightly
//!    (a dispatch cannot land before it was posted, a combine cannot be
//!    seen before it was posted), an offset outside those bounds is moved
//!    to the nearest one, and the move is reported.
//!
//! Then every message is drawn again from its raw stamps, and the events
//! are sorted by time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::fmt::Write as _;

use afmesh::trace::{metadata_events, pid_of, record_events, ts, Alignment, Record};
use afmesh::Peer;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum TraceCmd {
    /// Merge the per-rank traces in DIR into one file on one clock.
    Merge(MergeArgs),
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Directory the ranks wrote their traces into.
    dir: PathBuf,
    /// The merged trace (open it in ui.perfetto.dev or chrome://tracing).
    #[arg(short, long)]
    out: PathBuf,
    /// The job to merge, where DIR holds traces of several.
    #[arg(long)]
    job: Option<String>,
}

pub fn trace(cmd: &TraceCmd) -> Result<()> {
    match cmd {
        TraceCmd::Merge(a) => {
            let m = merge(&a.dir, a.job.as_deref())?;
            std::fs::write(&a.out, &m.json)
                .with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!(
                "afmesh trace merge: {} ranks, {} messages of job {} into {}",
                m.ranks,
                m.messages,
                m.job,
                a.out.display()
            );
            for line in &m.notes {
                eprintln!("  {line}");
            }
            Ok(())
        }
    }
}

/// One rank's trace file, read back.
#[derive(Debug)]
struct RankTrace {
    me: Peer,
    peers: u32,
    job: String,
    host_id: String,
    offset_ns: i64,
    error_ns: u64,
    rounds: u64,
    records: Vec<Record>,
}

fn parse_peer(s: &str) -> Option<Peer> {
    let (role, n) = s.split_at(1);
    let n: u32 = n.parse().ok()?;
    match role {
        "A" => Some(Peer::Attention(n)),
        "F" => Some(Peer::Ffn(n)),
        _ => None,
    }
}

fn read_rank(path: &Path) -> Result<Option<RankTrace>> {
    let text = std::fs::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text).context("not JSON")?;
    let info = &v["otherData"]["afmesh"];
    if info.is_null() {
        return Ok(None);
    }
    let rank = info["rank"].as_str().context("otherData.afmesh.rank")?;
    let me = parse_peer(rank).with_context(|| format!("rank {rank:?}"))?;
    let u = |v: &Value, what: &str| v.as_u64().with_context(|| format!("{what} is not a count"));
    let clock = &info["clock"];
    let mut records = Vec::new();
    for e in v["traceEvents"].as_array().context("traceEvents")? {
        if e["cat"] != "message" {
            continue;
        }
        let a = &e["args"];
        let peer = a["peer"]
            .as_str()
            .and_then(parse_peer)
            .context("a message without its peer")?;
        let peer = match peer {
            Peer::Attention(r) | Peer::Ffn(r) => r,
            Peer::Scheduler => continue,
        };
        records.push(Record {
            peer,
            stage: u(&a["stage"], "stage")? as u32,
            seq: u(&a["seq"], "seq")? as u32,
            post_ns: u(&a["post_ns"], "post_ns")?,
            land_ns: u(&a["land_ns"], "land_ns")?,
            process_ns: u(&a["process_ns"], "process_ns")?,
            respond_ns: u(&a["respond_ns"], "respond_ns")?,
            back_ns: u(&a["back_ns"], "back_ns")?,
        });
    }
    Ok(Some(RankTrace {
        me,
        peers: u(&info["peers"], "peers")? as u32,
        job: info["job"].as_str().unwrap_or_default().to_string(),
        host_id: info["host_id"].as_str().unwrap_or_default().to_string(),
        offset_ns: clock["offset_ns"].as_i64().context("clock.offset_ns")?,
        error_ns: u(&clock["error_ns"], "clock.error_ns")?,
        rounds: u(&clock["rounds"], "clock.rounds")?,
        records,
    }))
}

/// A merged trace.
pub struct Merged {
    pub json: String,
    pub job: String,
    pub ranks: usize,
    pub messages: usize,
    /// What the merge did to the clocks, for people.
    pub notes: Vec<String>,
}

pub fn merge(dir: &Path, job: Option<&str>) -> Result<Merged> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut ranks = Vec::new();
    for f in &files {
        match read_rank(f).with_context(|| format!("reading trace {}", f.display()))? {
            Some(r) if job.is_none_or(|j| j == r.job) => ranks.push(r),
            _ => {}
        }
    }
    let mut jobs: Vec<&str> = ranks.iter().map(|r| r.job.as_str()).collect();
    jobs.sort();
    jobs.dedup();
    let job = match jobs.as_slice() {
        [] => bail!("no afmesh rank traces in {}", dir.display()),
        [j] => j.to_string(),
        many => bail!(
            "{} holds traces of {} jobs ({}): pick one with --job",
            dir.display(),
            many.len(),
            many.join(", ")
        ),
    };
    let mut seen = BTreeMap::new();
    for r in &ranks {
        if seen.insert(r.me.to_string(), ()).is_some() {
            bail!("two traces of {} for job {job}", r.me);
        }
    }
    let (offsets, notes) = align(&ranks);
    let off = |p: Peer, fallback: i64| offsets.get(&p.to_string()).copied().unwrap_or(fallback);

    // The origin: the earliest aligned stamp.
    let mut base = i64::MAX;
    for r in &ranks {
        let mine = off(r.me, 0);
        for rec in &r.records {
            let first = match r.me {
                Peer::Attention(_) => rec.post_ns,
                _ => rec.land_ns,
            };
            base = base.min((first as i128 + mine as i128) as i64);
        }
    }
    if base == i64::MAX {
        base = 0;
    }

    let mut meta = String::new();
    let mut body = String::new();
    let mut messages = 0;
    let mut flows = 0u64;
    for r in &ranks {
        metadata_events(r.me, r.peers, &mut meta);
        let mine = off(r.me, 0);
        for rec in &r.records {
            let (attention_ns, ffn_ns) = match r.me {
                Peer::Attention(_) => (mine, off(Peer::Ffn(rec.peer), mine)),
                _ => (off(Peer::Attention(rec.peer), mine), mine),
            };
            let align = Alignment {
                attention_ns,
                ffn_ns,
                base_ns: base,
            };
            if !body.is_empty() {
                body.push(',');
            }
            record_events(r.me, rec, align, &mut body);
            messages += 1;
            // An arrow from the dispatch's post to its landing on the FFN
            // rank's track, where that rank's trace is here too.
            if let Peer::Attention(i) = r.me {
                if seen.contains_key(&Peer::Ffn(rec.peer).to_string()) {
                    flows += 1;
                    let (a_pid, f_pid) = (pid_of(r.me), pid_of(Peer::Ffn(rec.peer)));
                    let _ = writeln!(
                        body,
                        ",{{\"name\":\"dispatch\",\"cat\":\"flow\",\"ph\":\"s\",\"id\":{flows},\"pid\":{a_pid},\"tid\":{},\"ts\":{}}},{{\"name\":\"dispatch\",\"cat\":\"flow\",\"ph\":\"f\",\"bp\":\"e\",\"id\":{flows},\"pid\":{f_pid},\"tid\":{},\"ts\":{}}}",
                        rec.peer + 1,
                        ts(rec.post_ns, attention_ns, base),
                        i + 1,
                        ts(rec.land_ns, ffn_ns, base),
                    );
                }
            }
        }
    }
    let events: Vec<Value> = serde_json::from_str(&format!(
        "[{}{}]",
        meta.trim_end().trim_end_matches(',').to_string() + if body.is_empty() { "" } else { "," },
        body
    ))
    .context("building the merged events")?;
    let mut events = events;
    // Metadata first, then by time (stable: a span before its phases).
    events.sort_by(|a, b| {
        let key = |e: &Value| (e["ph"] != "M", e["ts"].as_f64().unwrap_or(0.0));
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    });
    let clocks: Vec<Value> = ranks
        .iter()
        .map(|r| {
            serde_json::json!({
                "rank": r.me.to_string(),
                "host_id": r.host_id,
                "estimate_ns": r.offset_ns,
                "error_ns": r.error_ns,
                "rounds": r.rounds,
                "applied_ns": off(r.me, 0),
            })
        })
        .collect();
    let out = serde_json::json!({
        "displayTimeUnit": "ns",
        "otherData": {"afmesh_merge": {"job": job, "base_ns": base, "clocks": clocks, "notes": notes}},
        "traceEvents": events,
    });
    Ok(Merged {
        json: serde_json::to_string(&out)?,
        job,
        ranks: ranks.len(),
        messages,
        notes,
    })
}

/// Each rank's offset onto the server's clock (by rank name), and notes
/// on what was decided.
fn align(ranks: &[RankTrace]) -> (BTreeMap<String, i64>, Vec<String>) {
    let mut notes = Vec::new();
    // 1. One offset per host: the tightest estimate there.
    let mut best: BTreeMap<&str, (u64, i64, String)> = BTreeMap::new();
    for r in ranks.iter().filter(|r| r.rounds > 0) {
        let e = best
            .entry(r.host_id.as_str())
            .or_insert((u64::MAX, 0, String::new()));
        if r.error_ns < e.0 {
            *e = (r.error_ns, r.offset_ns, r.me.to_string());
        }
    }
    let mut offsets: BTreeMap<String, i64> = BTreeMap::new();
    for r in ranks {
        let o = match best.get(r.host_id.as_str()) {
            Some((_, o, _)) => *o,
            None => {
                notes.push(format!(
                    "{}: no clock estimate (not joined through a scheduler); offset 0",
                    r.me
                ));
                0
            }
        };
        offsets.insert(r.me.to_string(), o);
    }
    for (host, (err, o, from)) in &best {
        notes.push(format!(
            "host {host:?}: offset {o} ns ± {err} ns (from {from})"
        ));
    }
    // 2. Causality bounds on the offset of each host of FFN ranks only,
    // from the attention ranks (whose files hold whole round trips) on the
    // other hosts, whose offsets stay: a dispatch lands after its post, a
    // combine is seen after it left. Ranks of one host keep one offset.
    let host_of: BTreeMap<String, &str> = ranks
        .iter()
        .map(|r| (r.me.to_string(), r.host_id.as_str()))
        .collect();
    let attention_hosts: Vec<&str> = ranks
        .iter()
        .filter(|r| matches!(r.me, Peer::Attention(_)))
        .map(|r| r.host_id.as_str())
        .collect();
    let mut bounds: BTreeMap<&str, (i128, i128)> = BTreeMap::new();
    for r in ranks {
        let Peer::Attention(_) = r.me else { continue };
        let oa = offsets[&r.me.to_string()] as i128;
        for rec in &r.records {
            let Some(&host) = host_of.get(&Peer::Ffn(rec.peer).to_string()) else {
                continue;
            };
            if attention_hosts.contains(&host) {
                continue;
            }
            let b = bounds.entry(host).or_insert((i128::MIN, i128::MAX));
            // land + of >= post + oa; respond + of <= back + oa.
            b.0 = b.0.max(rec.post_ns as i128 + oa - rec.land_ns as i128);
            b.1 = b.1.min(rec.back_ns as i128 + oa - rec.respond_ns as i128);
        }
    }
    for (host, (lo, hi)) in bounds {
        let members: Vec<String> = ranks
            .iter()
            .filter(|r| r.host_id == host)
            .map(|r| r.me.to_string())
            .collect();
        let Some(cur) = members.first().map(|m| offsets[m] as i128) else {
            continue;
        };
        if lo > hi {
            notes.push(format!(
                "host {host:?}: the messages admit no single offset (bounds {lo}..{hi} ns); kept {cur} ns"
            ));
        } else if cur < lo || cur > hi {
            let to = cur.clamp(lo, hi);
            notes.push(format!(
                "host {host:?} ({}): offset moved by {} ns to {to} ns, inside what its messages allow ({lo}..{hi} ns)",
                members.join(","),
                to - cur
            ));
            for m in &members {
                offsets.insert(m.clone(), to as i64);
            }
        }
    }
    (offsets, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(
        me: Peer,
        host: &str,
        offset_ns: i64,
        error_ns: u64,
        records: Vec<Record>,
    ) -> RankTrace {
        RankTrace {
            me,
            peers: 1,
            job: "j".into(),
            host_id: host.into(),
            offset_ns,
            error_ns,
            rounds: 8,
            records,
        }
    }

    /// A0 on the server's clock; F0's clock 50 µs behind it. A message
    /// posted at `t` (A clock) takes 2 µs each way and 3 µs inside F0.
    fn exchange(t: u64) -> Record {
        skewed(t, 50_000)
    }

    fn skewed(t: u64, skew: u64) -> Record {
        let land = t + 2_000 - skew;
        Record {
            peer: 0,
            stage: 0,
            seq: 0,
            post_ns: t,
            land_ns: land,
            process_ns: land + 1_000,
            respond_ns: land + 3_000,
            back_ns: t + 7_000,
        }
    }

    #[test]
    fn ranks_of_one_host_share_the_tightest_offset() {
        let ranks = [
            rank(
                Peer::Attention(0),
                "h",
                300,
                900,
                vec![skewed(1_000_000, 0)],
            ),
            rank(Peer::Ffn(0), "h", -200, 400, vec![]),
        ];
        let (off, _) = align(&ranks);
        assert_eq!((off["A0"], off["F0"]), (-200, -200));
    }

    #[test]
    fn an_offset_its_messages_rule_out_is_moved_inside_their_bounds() {
        // F0's estimate (40 µs, "± 10 ns") is wrong: its messages say the
        // offset is within 48..52 µs.
        let ranks = [
            rank(
                Peer::Attention(0),
                "a",
                0,
                10,
                vec![exchange(1_000_000), exchange(2_000_000)],
            ),
            rank(Peer::Ffn(0), "b", 40_000, 10, vec![]),
        ];
        let (off, notes) = align(&ranks);
        assert_eq!(off["A0"], 0);
        assert_eq!(off["F0"], 48_000, "{notes:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("(F0): offset moved by 8000 ns")),
            "{notes:?}"
        );
        // An estimate inside the bounds is kept.
        let ranks = [
            rank(Peer::Attention(0), "a", 0, 10, vec![exchange(1_000_000)]),
            rank(Peer::Ffn(0), "b", 50_500, 10, vec![]),
        ];
        assert_eq!(align(&ranks).0["F0"], 50_500);
    }
}
