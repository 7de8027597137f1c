//! Message traces as Chrome/Perfetto trace-event JSON.
//!
//! With `AFMESH_TRACE=DIR` a rank writes `DIR/<job>-<rank>.json` (`A0`,
//! `F1`, ...): one process per rank, one track (thread) per peer, and for
//! every message exchanged with that peer a `message` span with its phases
//! inside. An attention rank's span runs from posting the dispatch to
//! seeing the combine (`dispatch` post → land, `queued` land → process,
//! `ffn` process → respond, `combine` respond → back); an FFN rank's from
//! the dispatch landing to posting the response (`queued`, `ffn`). The span
//! carries stage, sequence and every raw stamp (wall-clock ns) in `args`.
//!
//! Stamps are each taken on the clock of the rank that took them (post and
//! back on the attention rank, land, process and respond on the FFN rank).
//! A rank's own file shows them unaligned; `otherData.afmesh.clock` holds
//! the rank's offset against the rendezvous server's clock and its error
//! bound (estimated at join, see [`bootstrap::clock`](crate::bootstrap::clock)),
//! and `afmesh trace merge DIR -o job.json` puts every rank on that clock.
//!
//! The recorder is a preallocated ring of fixed-size records: recording a
//! message is a copy into it, with no allocation, lock or system call. When
//! the ring is full it is written out to the file and starts over, and the
//! rest is written when the rank shuts down (or is dropped).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::bootstrap::ClockOffset;
use crate::error::{Error, Peer, Result};

/// Records the ring holds by default (`AFMESH_TRACE_CAPACITY`): 64 Ki
/// records, 4 MiB.
pub const DEFAULT_CAPACITY: usize = 1 << 16;
/// Most records the ring may be asked to hold.
pub const MAX_CAPACITY: usize = 1 << 24;
/// Version of the `otherData.afmesh` block.
pub const FORMAT_VERSION: u32 = 1;

/// Where and how much to trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceConfig {
    /// Directory the rank's file goes into (created if missing).
    pub dir: PathBuf,
    /// Records held before they are written out.
    pub capacity: usize,
}

impl TraceConfig {
    /// From `AFMESH_TRACE` (the directory; unset or empty: no tracing) and
    /// `AFMESH_TRACE_CAPACITY` (records, default [`DEFAULT_CAPACITY`]).
    pub fn from_env() -> Result<Option<TraceConfig>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`TraceConfig::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<TraceConfig>> {
        let Some(dir) = get("AFMESH_TRACE").filter(|d| !d.trim().is_empty()) else {
            return Ok(None);
        };
        let capacity = match get("AFMESH_TRACE_CAPACITY") {
            None => DEFAULT_CAPACITY,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_CAPACITY).contains(&n) => n,
                _ => {
                    return Err(Error::config(format!(
                        "AFMESH_TRACE_CAPACITY={v:?}: expected a record count in 1..={MAX_CAPACITY}"
                    )))
                }
            },
        };
        Ok(Some(TraceConfig {
            dir: PathBuf::from(dir),
            capacity,
        }))
    }

    /// Creates the directory, so a rank that cannot trace fails before it
    /// joins.
    pub fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            Error::io(
                format!("AFMESH_TRACE={}: create directory", self.dir.display()),
                e,
            )
        })
    }
}

/// One message as a rank saw it: its peer, stage and sequence, and the
/// stamps (wall-clock ns, 0 where unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// Index of the peer among the other role's ranks.
    pub peer: u32,
    /// Stage.
    pub stage: u32,
    /// The stage's sequence number.
    pub seq: u32,
    /// Dispatch posted (attention clock).
    pub post_ns: u64,
    /// Dispatch landed (FFN clock).
    pub land_ns: u64,
    /// Batch handed to the FFN's caller (FFN clock).
    pub process_ns: u64,
    /// Combine posted (FFN clock).
    pub respond_ns: u64,
    /// Combine seen (attention clock); 0 in an FFN rank's record.
    pub back_ns: u64,
}

/// The trace process id of a rank: attention ranks first.
pub fn pid_of(peer: Peer) -> u64 {
    match peer {
        Peer::Attention(r) => 1 + u64::from(r),
        Peer::Ffn(r) => 1_000_001 + u64::from(r),
        Peer::Scheduler => 0,
    }
}

/// Shifts that put each clock's stamps on a common time line, and the
/// origin of that line (all in ns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Alignment {
    /// Added to the attention rank's stamps (post, back).
    pub attention_ns: i64,
    /// Added to the FFN rank's stamps (land, process, respond).
    pub ffn_ns: i64,
    /// Time-line origin: subtracted after shifting.
    pub base_ns: i64,
}

/// A stamp on the common time line in µs with ns digits, as JSON.
pub fn ts(stamp: u64, shift: i64, base: i64) -> String {
    let v = stamp as i128 + shift as i128 - base as i128;
    let (sign, a) = if v < 0 { ("-", -v) } else { ("", v) };
    format!("{sign}{}.{:03}", a / 1000, a % 1000)
}

/// The trace events of one record seen by rank `me` (JSON objects, each
/// ending in `,\n` but the last, which ends in `\n`).
pub fn record_events(me: Peer, rec: &Record, align: Alignment, out: &mut String) {
    let pid = pid_of(me);
    let tid = u64::from(rec.peer) + 1;
    let (peer, attention) = match me {
        Peer::Attention(_) => (Peer::Ffn(rec.peer), true),
        _ => (Peer::Attention(rec.peer), false),
    };
    let a = |s: u64| (s, align.attention_ns);
    let f = |s: u64| (s, align.ffn_ns);
    let base = align.base_ns;
    let span = |out: &mut String, name: &str, cat: &str, from: (u64, i64), to: (u64, i64)| {
        let start = from.0 as i128 + from.1 as i128;
        let end = to.0 as i128 + to.1 as i128;
        let dur = (end - start).max(0);
        let _ = write!(
            out,
            "{{\"name\":\"{name}\",\"cat\":\"{cat}\",\"ph\":\"X\",\"pid\":{pid},\"tid\":{tid},\"ts\":{},\"dur\":{}.{:03}",
            ts(from.0, from.1, base),
            dur / 1000,
            dur % 1000
        );
    };
    let (from, to) = if attention {
        (a(rec.post_ns), a(rec.back_ns))
    } else {
        (f(rec.land_ns), f(rec.respond_ns))
    };
    span(out, &format!("stage {}", rec.stage), "message", from, to);
    let _ = writeln!(
        out,
        ",\"args\":{{\"peer\":\"{peer}\",\"stage\":{},\"seq\":{},\"post_ns\":{},\"land_ns\":{},\"process_ns\":{},\"respond_ns\":{},\"back_ns\":{}}}}},",
        rec.stage, rec.seq, rec.post_ns, rec.land_ns, rec.process_ns, rec.respond_ns, rec.back_ns
    );
    // (name, start, end); a stamp is (value, the shift of its clock).
    type Stamp = (u64, i64);
    let mut phases: Vec<(&str, Stamp, Stamp)> = Vec::with_capacity(4);
    if attention {
        phases.push(("dispatch", a(rec.post_ns), f(rec.land_ns)));
    }
    phases.push(("queued", f(rec.land_ns), f(rec.process_ns)));
    phases.push(("ffn", f(rec.process_ns), f(rec.respond_ns)));
    if attention {
        phases.push(("combine", f(rec.respond_ns), a(rec.back_ns)));
    }
    let last = phases.len() - 1;
    for (i, (name, from, to)) in phases.into_iter().enumerate() {
        span(out, name, "phase", from, to);
        out.push_str(if i == last { "}\n" } else { "},\n" });
    }
}

/// Metadata events naming rank `me`'s process and its tracks, one per
/// peer (`peers` of them), each ending in `,\n`.
pub fn metadata_events(me: Peer, peers: u32, out: &mut String) {
    let pid = pid_of(me);
    let _ = writeln!(
        out,
        "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{pid},\"args\":{{\"name\":\"{me}\"}}}},"
    );
    let _ = writeln!(
        out,
        "{{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":{pid},\"args\":{{\"sort_index\":{pid}}}}},"
    );
    for p in 0..peers {
        let peer = match me {
            Peer::Attention(_) => Peer::Ffn(p),
            _ => Peer::Attention(p),
        };
        let _ = writeln!(
            out,
            "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":{pid},\"tid\":{},\"args\":{{\"name\":\"{peer}\"}}}},",
            p + 1
        );
    }
}

/// What a rank's file says about the rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankMeta {
    /// The rank.
    pub me: Peer,
    /// Ranks of the other role.
    pub peers: u32,
    /// Job name.
    pub job: String,
    /// Host identity.
    pub host_id: String,
    /// Clock offset against the rendezvous server, if estimated.
    pub clock: ClockOffset,
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The file name of a rank's trace: `<job>-<rank>.json`, the job's
/// characters outside `[A-Za-z0-9._-]` replaced by `_`.
pub fn file_name(job: &str, me: Peer) -> String {
    let job: String = job
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{job}-{me}.json")
}

/// A rank's recorder: the ring and the file it drains into.
#[derive(Debug)]
pub(crate) struct Recorder {
    ring: Vec<Record>,
    out: Option<BufWriter<File>>,
    path: PathBuf,
    me: Peer,
    /// Records written out so far.
    written: u64,
    /// Whether an event has been written after the metadata.
    any: bool,
}

impl Recorder {
    /// Creates the rank's file in `cfg.dir` and writes its header.
    pub(crate) fn create(cfg: &TraceConfig, meta: &RankMeta) -> Result<Recorder> {
        let path = cfg.dir.join(file_name(&meta.job, meta.me));
        let file = File::create(&path)
            .map_err(|e| Error::io(format!("AFMESH_TRACE: create {}", path.display()), e))?;
        let mut head = String::new();
        let _ = writeln!(
            head,
            "{{\"displayTimeUnit\":\"ns\",\"otherData\":{{\"afmesh\":{{\"version\":{FORMAT_VERSION},\"rank\":\"{}\",\"pid\":{},\"peers\":{},\"job\":{},\"host_id\":{},\"clock\":{{\"reference\":\"rendezvous\",\"offset_ns\":{},\"error_ns\":{},\"rounds\":{}}},\"capacity\":{}}}}},\"traceEvents\":[",
            meta.me,
            pid_of(meta.me),
            meta.peers,
            json_str(&meta.job),
            json_str(&meta.host_id),
            meta.clock.offset_ns,
            meta.clock.error_ns,
            meta.clock.rounds,
            cfg.capacity
        );
        metadata_events(meta.me, meta.peers, &mut head);
        let mut out = BufWriter::with_capacity(1 << 16, file);
        out.write_all(head.as_bytes())
            .map_err(|e| Error::io(format!("AFMESH_TRACE: write {}", path.display()), e))?;
        Ok(Recorder {
            ring: Vec::with_capacity(cfg.capacity),
            out: Some(out),
            path,
            me: meta.me,
            written: 0,
            any: false,
        })
    }

    /// Records one message: a copy into the ring (written out first when
    /// the ring is full).
    #[inline]
    pub(crate) fn record(&mut self, r: Record) {
        if self.ring.len() == self.ring.capacity() {
            self.drain();
        }
        // Within the capacity reserved at creation: never reallocates.
        self.ring.push(r);
    }

    /// Where the trace goes.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the ring's records out and empties it.
    fn drain(&mut self) {
        let Some(out) = self.out.as_mut() else {
            self.ring.clear();
            return;
        };
        let mut text = String::with_capacity(self.ring.len() * 900);
        for r in &self.ring {
            if self.any {
                // The previous record's last event.
                text.push(',');
            }
            record_events(self.me, r, Alignment::default(), &mut text);
            self.any = true;
        }
        self.written += self.ring.len() as u64;
        self.ring.clear();
        if let Err(e) = out.write_all(text.as_bytes()) {
            tracing::warn!(
                "AFMESH_TRACE: writing {} failed, tracing stops: {e}",
                self.path.display()
            );
            self.out = None;
        }
    }

    /// Writes everything out and closes the file. Later records are
    /// dropped.
    pub(crate) fn finish(&mut self) {
        self.drain();
        if let Some(mut out) = self.out.take() {
            // The metadata events end in a comma: close with one more.
            let tail = format!(
                "{}{{\"name\":\"trace_end\",\"ph\":\"M\",\"pid\":{},\"args\":{{\"records\":{}}}}}\n]}}\n",
                if self.any { "," } else { "" },
                pid_of(self.me),
                self.written
            );
            if let Err(e) = out.write_all(tail.as_bytes()).and_then(|()| out.flush()) {
                tracing::warn!("AFMESH_TRACE: writing {} failed: {e}", self.path.display());
            } else {
                tracing::info!(
                    "trace of {} messages written to {}",
                    self.written,
                    self.path.display()
                );
            }
        }
        // Nothing more is recorded: the capacity goes.
        self.ring = Vec::new();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(me: Peer) -> RankMeta {
        RankMeta {
            me,
            peers: 2,
            job: "j/1".into(),
            host_id: "h\"x".into(),
            clock: ClockOffset {
                offset_ns: -42,
                error_ns: 7,
                rounds: 8,
            },
        }
    }

    fn rec(peer: u32, seq: u32) -> Record {
        let t = 1_700_000_000_000_000_000 + u64::from(seq) * 10_000;
        Record {
            peer,
            stage: 1,
            seq,
            post_ns: t,
            land_ns: t + 1_500,
            process_ns: t + 2_000,
            respond_ns: t + 3_001,
            back_ns: t + 4_999,
        }
    }

    fn read(path: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn a_ring_that_fills_is_written_out_and_every_record_lands_in_the_file() {
        let dir = std::env::temp_dir().join(format!("afmesh-trace-{}", std::process::id()));
        let cfg = TraceConfig {
            dir: dir.clone(),
            capacity: 3,
        };
        cfg.prepare().unwrap();
        let mut r = Recorder::create(&cfg, &meta(Peer::Attention(0))).unwrap();
        assert_eq!(r.path(), dir.join("j_1-A0.json"));
        for seq in 0..7 {
            r.record(rec(seq % 2, seq));
            assert!(r.ring.len() <= 3 && r.ring.capacity() == 3);
        }
        let path = r.path().to_path_buf();
        drop(r);
        let v = read(&path);
        let info = &v["otherData"]["afmesh"];
        assert_eq!(info["rank"], "A0");
        assert_eq!(info["host_id"], "h\"x");
        assert_eq!(info["clock"]["offset_ns"], -42);
        assert_eq!(info["clock"]["error_ns"], 7);
        let events = v["traceEvents"].as_array().unwrap();
        let spans: Vec<_> = events.iter().filter(|e| e["cat"] == "message").collect();
        assert_eq!(spans.len(), 7);
        for (i, s) in spans.iter().enumerate() {
            assert_eq!(s["args"]["seq"], i as u64);
            assert_eq!(s["tid"], (i % 2) as u64 + 1);
            assert_eq!(s["dur"].as_f64().unwrap(), 4.999);
        }
        // Four phases per message on an attention rank, inside its span.
        let phases: Vec<_> = events.iter().filter(|e| e["cat"] == "phase").collect();
        assert_eq!(phases.len(), 28);
        assert_eq!(phases[0]["name"], "dispatch");
        assert_eq!(phases[0]["dur"].as_f64().unwrap(), 1.5);
        assert_eq!(phases[3]["name"], "combine");
        assert_eq!(phases[3]["dur"].as_f64().unwrap(), 1.998);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_ffn_rank_without_messages_still_writes_valid_json() {
        let dir = std::env::temp_dir().join(format!("afmesh-trace-e-{}", std::process::id()));
        let cfg = TraceConfig {
            dir: dir.clone(),
            capacity: 4,
        };
        cfg.prepare().unwrap();
        let r = Recorder::create(&cfg, &meta(Peer::Ffn(3))).unwrap();
        let path = r.path().to_path_buf();
        drop(r);
        let v = read(&path);
        let names: Vec<_> = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "thread_name")
            .map(|e| e["args"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["A0", "A1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stamps_keep_their_nanoseconds_and_signs() {
        assert_eq!(ts(1_000_000_123_456, 0, 1_000_000_000_000), "123.456");
        assert_eq!(ts(5, -10, 0), "-0.005");
        assert_eq!(ts(2_000, 0, 1_000), "1.000");
    }

    #[test]
    fn bad_capacities_name_the_variable() {
        let get = |cap: &'static str| {
            move |k: &str| match k {
                "AFMESH_TRACE" => Some("/tmp/x".to_string()),
                "AFMESH_TRACE_CAPACITY" => Some(cap.to_string()),
                _ => None,
            }
        };
        for bad in ["0", "-1", "lots", "99999999999"] {
            let e = TraceConfig::from_lookup(get(bad)).unwrap_err();
            assert!(e.to_string().contains("AFMESH_TRACE_CAPACITY"), "{e}");
        }
        let ok = TraceConfig::from_lookup(get("10")).unwrap().unwrap();
        assert_eq!(ok.capacity, 10);
        assert_eq!(TraceConfig::from_lookup(|_| None).unwrap(), None);
    }
}
