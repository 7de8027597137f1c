//! `afmesh bench`: a whole mesh on this host, verified, against its floor.
//!
//! The mesh: an embedded scheduler and M+N `afmesh run` processes, every
//! byte checked. The floor: the same bytes per (attention, FFN) pair and
//! layer moved the plainest way, in the same run and pinned the same way
//! ([`crate::floor`]); where two plain ways exist, the faster, both
//! printed. Over tcp: M+N processes exchanging over one `TCP_NODELAY`
//! connection per pair, with blocking sockets and with polled non-blocking
//! ones. Over shared memory: M+N processes exchanging through per-pair
//! buffers and flags in one mapping, and one thread copying the layer's
//! bytes once. The tcp exchange sends each pair's stages as one
//! message each way, the shm exchange one message per stage; with
//! `--vary-tokens` both move the first timed layer's bytes every layer.
//!
//! Besides latency (p50, p99, p99.9 over every attention rank's timed
//! layers: each rank keeps a fixed-size histogram, the bench merges them,
//! and the floor's processes are summed up the same way), the bench reports copies per message: the bytes the library
//! itself copied over the bytes it sent, summed over every rank.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use afmesh::bootstrap::{Scheduler, SchedulerConfig};
use afmesh::transport::shm::sys;
use afmesh::Histogram;
use anyhow::{bail, Context, Result};
use clap::Args;

use crate::floor;
use crate::progress::Progress;
use crate::sweep::Sweep;
use crate::workload::Workload;
use crate::{json_str, DeviceArg, WorkloadArgs};

use std::path::PathBuf;

mod children;
mod floors;
mod report;
pub use children::{wait_all, Children};
use floors::{device_floors, floor_plan, Floors};
use report::{collect_links, elem};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Attention ranks M.
    #[arg(long, default_value_t = 1)]
    attention: u32,
    /// FFN ranks N.
    #[arg(long, default_value_t = 1)]
    ffn: u32,
    /// Transport: auto (verbs where an RDMA port is active, else shm
    /// between ranks of one host), tcp, shm or verbs (its floor: plain
    /// verbs calls); a comma list (shm,tcp) measures each in turn.
    #[arg(long, default_value = "auto")]
    transport: String,
    /// Measure a series: KEY=V1,V2,... with KEY one of tokens, hidden,
    /// attention, ffn, stages; prints a table row (or, with --json, a JSON
    /// line) per point as it goes, and a progress line on stderr.
    #[arg(long, value_name = "KEY=V1,V2,...")]
    sweep: Option<String>,
    /// Draw p50 latency and GB/s against bytes per layer, the floor beside
    /// each curve, one curve per transport, into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Every rank writes a Chrome/Perfetto trace of its messages into DIR
    /// (AFMESH_TRACE; a sub-directory per point of a series); merge them
    /// with `afmesh trace merge DIR -o job.json`.
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// Pin each rank to its own CPU: auto (when the ranks fit the CPUs),
    /// on, off.
    #[arg(long, value_enum, default_value_t = Pin::Auto)]
    pin: Pin,
    #[command(flatten)]
    work: WorkloadArgs,
}

/// `--pin`: whether each rank gets a CPU of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pin {
    /// When the ranks fit the CPUs.
    Auto,
    On,
    Off,
}

/// Order statistics of a run's per-layer times, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Of a histogram of nanoseconds.
    pub fn of(h: &Histogram) -> Summary {
        let us = |v: Option<u64>| v.unwrap_or(0) as f64 / 1e3;
        Summary {
            p50: us(h.quantile(0.5)),
            p99: us(h.quantile(0.99)),
            p999: us(h.quantile(0.999)),
            max: us(h.max()),
            mean: h.mean().unwrap_or(0.0) / 1e3,
        }
    }
}

/// A histogram as a JSON array of numbers ([`Histogram::to_words`]).
pub fn words_json(h: &Histogram) -> String {
    let words: Vec<String> = h.to_words().iter().map(u64::to_string).collect();
    format!("[{}]", words.join(","))
}

/// The `stragglers` of an attention rank's JSON report: (peer, stages it
/// answered last, mean lateness in us).
pub fn stragglers_of(line: &str) -> Option<Vec<(String, u64, f64)>> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["stragglers"]
        .as_array()?
        .iter()
        .map(|s| {
            Some((
                s["peer"].as_str()?.to_string(),
                s["count"].as_u64()?,
                s["mean_late_us"].as_f64()?,
            ))
        })
        .collect()
}

/// The `lat_ns` histogram of a rank's (or floor peer's) JSON report.
pub fn lat_of(line: &str) -> Option<Histogram> {
    let words: Option<Vec<u64>> = field(line, "lat_ns")?
        .trim_matches(['[', ']'])
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().ok())
        .collect();
    Histogram::from_words(&words?)
}

pub fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let k = format!("\"{key}\":");
    let start = json.find(&k)? + k.len();
    let rest = &json[start..];
    let end = if rest.starts_with('[') {
        rest.find(']')? + 1
    } else if let Some(body) = rest.strip_prefix('"') {
        body.find('"')? + 2
    } else {
        rest.find([',', '}'])?
    };
    Some(&rest[..end])
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    // SIGTERM and SIGINT end the bench through its wait loop, which kills
    // and reaps the ranks on the way out.
    sys::on_terminate().context("handling SIGTERM and SIGINT")?;
    let transports: Vec<&str> = args.transport.split(',').map(str::trim).collect();
    if let Some(t) = transports
        .iter()
        .find(|t| !["auto", "tcp", "shm", "verbs"].contains(t))
    {
        bail!("--transport {t}: expected auto, tcp, shm or verbs (or a comma list of them)");
    }
    let sweep = args.sweep.as_deref().map(Sweep::parse).transpose()?;
    if sweep.is_none() && transports.len() == 1 && args.plot.is_none() {
        let progress = Progress::new(1, false);
        progress.point(0, transports[0]);
        let p = measure(
            args,
            transports[0],
            &args.work,
            args.attention,
            args.ffn,
            args.trace.clone(),
            &progress,
        )?;
        progress.finish();
        if args.json {
            println!("{}", p.json());
        } else {
            p.print();
        }
        return p.verified();
    }
    // A series: every transport at every value of the swept key.
    let values = sweep.as_ref().map_or(vec![None], |s| {
        s.values.iter().map(|&v| Some((s.key, v))).collect()
    });
    let total = transports.len() * values.len();
    let progress = Progress::new(total, true);
    if !args.json {
        progress.out(Point::TABLE_HEADER);
    }
    let mut points = Vec::with_capacity(total);
    for (i, (t, v)) in transports
        .iter()
        .flat_map(|t| values.iter().map(move |v| (*t, *v)))
        .enumerate()
    {
        let (mut wa, mut m, mut n) = (args.work.clone(), args.attention, args.ffn);
        let what = match v {
            Some((key, v)) => {
                key.apply(v, &mut wa, &mut m, &mut n);
                format!("{}={v}", key.name())
            }
            None => "one point".into(),
        };
        progress.point(i, &format!("{t}, {what}"));
        let trace = args
            .trace
            .as_ref()
            .map(|d| d.join(format!("point-{}", i + 1)));
        let p = measure(args, t, &wa, m, n, trace, &progress)
            .with_context(|| format!("{t}, {what}"))?;
        if args.json {
            progress.out(&p.json());
        } else {
            progress.out(&p.table_row());
        }
        progress.done(i);
        points.push(p);
    }
    progress.finish();
    if let Some(file) = &args.plot {
        crate::plot::draw(file, &points).with_context(|| format!("drawing {}", file.display()))?;
        eprintln!("afmesh bench: plot written to {}", file.display());
    }
    points.iter().try_for_each(Point::verified)
}

/// One measured mesh and its floor.
#[derive(Debug)]
pub struct Point {
    pub transport: String,
    pub m: u32,
    pub n: u32,
    pub work: WorkloadArgs,
    /// Bytes one layer moves, both ways, headers included.
    pub layer_bytes: u64,
    pub lat: Summary,
    pub goodput: f64,
    copies: f64,
    floors: Floors,
    pub floor_p50: f64,
    floor_name: String,
    pub ratio: f64,
    ffn_us: f64,
    net_us: f64,
    /// Waits, over every rank, whose spin was cut short because the rank
    /// lost its core to another task.
    preempted_spins: u64,
    /// Over every rank, in the timed layers: what the machine took from
    /// the spinning waits.
    spin_gaps: SpinGaps,
    /// Milliseconds of this machine's CPU time the hypervisor gave to
    /// others while the mesh ran (`/proc/stat` steal, 10 ms grain; `None`
    /// where it cannot be read).
    steal_ms: Option<u64>,
    pin: bool,
    errors: u64,
    first_error: Option<String>,
    /// FFN ranks that answered stages last: (peer, stages, mean lateness
    /// in us), most often first, over every attention rank.
    stragglers: Vec<(String, u64, f64)>,
    /// Per link: (attention rank, FFN rank) → round trip, dispatch arrival,
    /// FFN processing, combine arrival (ns histograms, as the ranks kept
    /// them).
    links: BTreeMap<(String, String), [Option<Histogram>; 4]>,
    /// Verbs only: the post path's counters and the port.
    verbs: Option<VerbsWire>,
    /// `--device cuda`: NCCL send/recv of the same pattern, or why not.
    nccl: Option<Result<Summary, String>>,
}

/// What the machine took from the ranks' spinning waits in the timed
/// layers ([`afmesh::transport::Gaps`]), summed over every rank.
#[derive(Debug, Clone, Copy, Default)]
struct SpinGaps {
    /// Microseconds the waits spun (where measured: spins that never
    /// yield, over backends that poll at a flat cost).
    spun_us: u64,
    /// Stretches of it in which the thread did not run.
    gaps: u64,
    /// Microseconds those took.
    lost_us: u64,
}

/// What a verbs mesh's post paths did, per message, and the port.
#[derive(Debug, Clone, Copy)]
struct VerbsWire {
    wrs_per_msg: f64,
    signaled_per_msg: f64,
    flushes_per_msg: f64,
    port_gbps: f64,
    /// Only when a real port is present (not softverbs).
    line_rate_pct: Option<f64>,
}

/// CPU time stolen from this (virtual) machine by its host so far, all
/// CPUs together, in ms: `/proc/stat`'s steal column, in USER_HZ ticks
/// (100 a second on Linux).
fn steal_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: u64 = cpu.split_whitespace().nth(7)?.parse().ok()?;
    Some(ticks.saturating_mul(10))
}

/// Runs one mesh of `wa` on M×N over `transport_arg` and its floor.
fn measure(
    args: &BenchArgs,
    transport_arg: &str,
    wa: &WorkloadArgs,
    m: u32,
    n: u32,
    trace: Option<PathBuf>,
    progress: &Progress,
) -> Result<Point> {
    let w = wa.workload();
    w.spec()?;
    if m == 0 || n == 0 {
        bail!("need at least one attention and one FFN rank");
    }
    w.check_memory(m, n)?;
    let sched = Scheduler::bind(
        "127.0.0.1:0",
        SchedulerConfig {
            attention: Some(m),
            ffn: Some(n),
            join_timeout: Duration::from_secs(60),
            ..SchedulerConfig::default()
        },
    )?
    .spawn()?;
    let addr = sched.addr().to_string();
    let exe = std::env::current_exe().context("locating the afmesh binary")?;
    let mut children = Children(Vec::new());
    // One core per rank when they fit, as a deployment would pin them;
    // otherwise the scheduler places them (and the poll policy yields).
    // "Fit" counts what the job may use (its CPU mask and, in a container,
    // its CPU quota).
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let pin = match args.pin {
        // Tcp ranks too: left to the scheduler, the reference stage's p50
        // was 1.09-1.46x the (pinned alike) floor; pinned, within 1.2x in
        // 20 of 22 runs (ARCHITECTURE.md, tcp).
        Pin::Auto => (m + n) as usize <= cpus,
        Pin::On => true,
        Pin::Off => false,
    };
    // Pinned ranks take the CPUs of the job's mask in turn, so `taskset -c
    // 8-15 afmesh bench` pins them to 8, 9...
    let allowed = if pin {
        let a = sys::allowed_cpus().context("reading this process's CPU set")?;
        if a.is_empty() {
            bail!("this process may run on no CPU");
        }
        Some(a)
    } else {
        None
    };
    for (role, count) in [("ffn", n), ("attention", m)] {
        for r in 0..count {
            let mut cmd = Command::new(&exe);
            if let Some(cpu) = allowed
                .as_deref()
                .and_then(|a| floor::rank_cpu(a, n, role, r))
            {
                cmd.env("AFMESH_CPU", cpu.to_string());
            }
            cmd.args([
                "run",
                "--json",
                "--quiet",
                "--role",
                role,
                "--scheduler",
                &addr,
            ])
            .args([
                "--attention",
                &m.to_string(),
                "--ffn",
                &n.to_string(),
                "--rank",
                &r.to_string(),
            ])
            .args([
                "--tokens",
                &wa.tokens.to_string(),
                "--hidden",
                &wa.hidden.to_string(),
            ])
            .args([
                "--dispatch-dtype",
                elem(wa.dispatch_dtype),
                "--combine-dtype",
                elem(wa.combine_dtype),
            ])
            .args([
                "--stages",
                &wa.stages.to_string(),
                "--iters",
                &wa.iters.to_string(),
            ])
            .args([
                "--warmup",
                &wa.warmup.to_string(),
                "--timeout-ms",
                &wa.timeout_ms.to_string(),
            ])
            .env("AFMESH_JOB", format!("bench-{}", std::process::id()))
            .env("AFMESH_TRANSPORT", transport_arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
            if wa.caller_buffers {
                cmd.arg("--caller-buffers");
            }
            if let Some(dir) = &trace {
                cmd.env("AFMESH_TRACE", dir);
            }
            if wa.vary_tokens {
                cmd.arg("--vary-tokens");
            }
            if wa.device == DeviceArg::Cuda {
                cmd.args(["--device", "cuda"]);
            }
            if wa.stream_ordered {
                cmd.arg("--stream-ordered");
            }
            if let Some(l) = wa.layout {
                cmd.args(["--layout", l.name()]);
            }
            if wa.copy_rows {
                cmd.arg("--copy-rows");
            }
            children.spawn(format!("{role} rank {r}"), &mut cmd)?;
        }
    }
    progress.phase(&format!("{m}A+{n}F mesh, {} layers", w.layers()));
    let budget = Duration::from_secs(60) + Duration::from_millis(u64::from(w.layers()) * 50);
    let steal_before = steal_ms();
    let outs = wait_all(&mut children, Instant::now() + budget)?;
    let steal = steal_before
        .zip(steal_ms())
        .map(|(a, b)| b.saturating_sub(a));
    drop(children);
    let _ = sched.join();
    if let Some(dir) = &trace {
        progress.note(&format!(
            "afmesh bench: traces in {0}; merge: afmesh trace merge {0} -o job.json",
            dir.display()
        ));
    }

    let mut lat = Histogram::new();
    let mut reports = 0u32;
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    let (mut ffn_us, mut net_us) = (0.0, 0.0);
    let (mut sent_bytes, mut copied_bytes) = (0u64, 0u64);
    let mut transport = String::new();
    // Per FFN rank, over every attention rank: stages it answered last and
    // the sum of its lateness (us).
    let mut late: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    // Work requests (data ones, i.e. less flushes and probes), signalled
    // ones, flushes, messages, preempted spins: summed over every rank.
    let mut wire = [0u64; 5];
    let mut gaps = SpinGaps::default();
    let mut links: BTreeMap<(String, String), [Option<Histogram>; 4]> = BTreeMap::new();
    for o in &outs {
        let line = o.lines().last().unwrap_or("");
        collect_links(line, &mut links);
        let count = |key: &str| -> Result<u64> {
            field(line, key)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("rank output lacks {key}: {line}"))
        };
        errors += count("errors")?;
        for (k, key) in [
            "work_requests",
            "signaled",
            "flushes",
            "messages",
            "preempted_spins",
        ]
        .iter()
        .enumerate()
        {
            wire[k] += field(line, key).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
        gaps.spun_us += count("spun_us")?;
        gaps.gaps += count("spin_gaps")?;
        gaps.lost_us += count("spin_gap_us")?;
        sent_bytes += count("sent_bytes")?;
        copied_bytes += count("copied_bytes")?;
        if let Some(fe) = field(line, "first_error").filter(|v| *v != "null") {
            first_error.get_or_insert(fe.trim_matches('"').to_string());
        }
        if let Some(t) = field(line, "transport") {
            transport = t.trim_matches('"').to_string();
        }
        if let Some(list) = stragglers_of(line) {
            for (peer, count, mean_us) in list {
                let e = late.entry(peer).or_insert((0, 0.0));
                e.0 += count;
                e.1 += mean_us * count as f64;
            }
        }
        if let Some(h) = lat_of(line) {
            lat.merge(&h);
            reports += 1;
            ffn_us += field(line, "ffn_us")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                / f64::from(m);
            net_us += field(line, "net_us")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                / f64::from(m);
        }
    }
    if reports != m {
        bail!("expected {m} attention reports, got {reports}");
    }
    let mesh = Summary::of(&lat);
    let copies = if sent_bytes == 0 {
        0.0
    } else {
        copied_bytes as f64 / sent_bytes as f64
    };
    let (d, c) = w.layer_bytes(m, n);
    let plan = floor_plan(&w, m, n, allowed.clone());
    progress.phase("floor");
    let mut verbs = None;
    let mut nccl = None;
    let floors = if wa.device == DeviceArg::Cuda {
        let (floor, n_res) = device_floors(&w, m, n)?;
        nccl = Some(n_res);
        floor
    } else if transport == "verbs" {
        let v = floor::verbs::run(&plan).context("plain verbs floor")?;
        let msgs = wire[3].max(1) as f64;
        let goodput_gbits = (d + c) as f64 * 8.0 / (mesh.mean * 1e-6) / 1e9;
        let real = v.port_gbps > 0.0 && !v.device.starts_with("softverbs");
        verbs = Some(VerbsWire {
            wrs_per_msg: (wire[0] - wire[2]) as f64 / msgs,
            signaled_per_msg: wire[1] as f64 / msgs,
            flushes_per_msg: wire[2] as f64 / msgs,
            port_gbps: v.port_gbps,
            line_rate_pct: real.then(|| 100.0 * goodput_gbits / v.port_gbps),
        });
        let lat = Summary::of(&v.lat);
        Floors {
            exchange: lat.p50,
            exchange_p99: lat.p99,
            exchange_name: format!(
                "plain verbs exchange, {m}+{n} processes, one QP per pair, one signalled write-with-imm per message"
            ),
            polled: None,
            memcpy: None,
            unread: None,
        }
    } else if transport == "shm" {
        let exchange = floor::shm(&plan, true).context("shm floor")?;
        let unread = floor::shm(&plan, false).context("shm floor, unread")?;
        let memcpy = floor::memcpy(d, c, plan.warmup + plan.iters);
        let exchange = Summary::of(&exchange);
        Floors {
            exchange: exchange.p50,
            exchange_p99: exchange.p99,
            exchange_name: format!("shm exchange, {m}+{n} processes, receivers read what they get"),
            polled: None,
            memcpy: Some(Summary::of(&memcpy).p50),
            unread: Some(Summary::of(&unread).p50),
        }
    } else {
        let blocking = floor::tcp(&plan, false).context("tcp floor")?;
        let polled = floor::tcp(&plan, true).context("polled tcp floor")?;
        let blocking = Summary::of(&blocking);
        Floors {
            exchange: blocking.p50,
            exchange_p99: blocking.p99,
            exchange_name: format!("tcp exchange, {m}+{n} processes"),
            polled: Some(Summary::of(&polled).p50),
            memcpy: None,
            unread: None,
        }
    };
    let mut stragglers: Vec<(String, u64, f64)> = late
        .into_iter()
        .map(|(peer, (count, sum))| (peer, count, sum / count.max(1) as f64))
        .collect();
    stragglers.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)));
    let (floor_p50, floor_name) = floors.best();
    let goodput = (d + c) as f64 / (mesh.mean * 1e-6) / 1e9;
    Ok(Point {
        transport,
        m,
        n,
        work: wa.clone(),
        layer_bytes: d + c,
        lat: mesh,
        goodput,
        copies,
        ratio: mesh.p50 / floor_p50,
        floors,
        floor_p50,
        floor_name,
        ffn_us,
        net_us,
        preempted_spins: wire[4],
        spin_gaps: gaps,
        steal_ms: steal,
        pin,
        errors,
        first_error,
        stragglers,
        links,
        verbs,
        nccl,
    })
}

#[cfg(test)]
mod tests {
    use afmesh::Histogram;

    use super::{lat_of, words_json, Summary};

    #[test]
    fn a_report_carries_its_histogram_exactly() {
        let mut h = Histogram::new();
        for ns in (1..=1000u64).map(|i| i * 1000) {
            h.record(ns);
        }
        let line = format!("{{\"errors\":0,\"lat_ns\":{},\"x\":1}}", words_json(&h));
        let back = lat_of(&line).expect("a histogram");
        assert_eq!(back, h);
        let s = Summary::of(&back);
        // 1..1000 us: the nearest-rank quantiles, within 1/128.
        for (got, want) in [(s.p50, 500.0), (s.p99, 990.0), (s.p999, 999.0)] {
            assert!((got - want).abs() <= want / 128.0, "{got} vs {want}");
        }
        assert_eq!((s.max, s.mean), (1000.0, 500.5));
        assert_eq!(lat_of("{\"lat_ns\":[1,2,3]}"), None);
    }
}
