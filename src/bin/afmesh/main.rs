//! The `afmesh` command: the rendezvous server, one rank of a multi-host
//! run, and a whole-mesh benchmark on this host.

mod bench;
mod device;
mod floor;
mod plot;
mod progress;
mod summary;
mod sweep;
mod trace;
mod workload;

use std::time::Duration;

use afmesh::bootstrap::{Scheduler, SchedulerConfig, Token};
use afmesh::{Mesh, MeshConfig, Role};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use workload::{Elem, Workload};

#[derive(Parser, Debug)]
#[command(
    name = "afmesh",
    version,
    about = "M-to-N dispatch/combine for attention-FFN disaggregated inference"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the rendezvous server until every rank of the mesh has left.
    ///
    /// A setup attempt that fails (a rank refused or dead) is reported to
    /// every rank at once; the scheduler then waits for a fresh attempt,
    /// and exits with an error when none forms within --join-timeout.
    Scheduler {
        /// Address to listen on: HOST:PORT, or a PORT on the default host,
        /// which is 127.0.0.1 without a cluster token and 0.0.0.0 with one.
        /// Default: AFMESH_SCHEDULER, else DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT
        /// (where the ranks connect), else port 8123.
        #[arg(long)]
        bind: Option<String>,
        /// Cluster token every rank must prove (default: AFMESH_TOKEN).
        /// Visible to other users in the process list: prefer --token-file.
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// File holding the cluster token (default: AFMESH_TOKEN_FILE).
        #[arg(long)]
        token_file: Option<std::path::PathBuf>,
        /// Attention ranks to admit to each mesh (default:
        /// AFMESH_NUM_ATTENTION, else DMLC_NUM_WORKER, else the first rank's
        /// hello); DMLC_GROUP_SIZE meshes (instance groups) are formed.
        #[arg(long)]
        attention: Option<u32>,
        /// FFN ranks to admit to each mesh (default: AFMESH_NUM_FFN, else
        /// DMLC_NUM_SERVER, else the first rank's hello).
        #[arg(long)]
        ffn: Option<u32>,
        /// Job name (default: AFMESH_JOB, else the first rank's hello).
        #[arg(long)]
        job: Option<String>,
        /// Seconds a setup attempt may take to form.
        #[arg(long, default_value_t = 60)]
        join_timeout: u64,
        /// Print the job summary (what every `afmesh run` rank reported)
        /// as one JSON object on stdout, instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one rank of a mesh on the self-checking synthetic workload, or,
    /// when the role is `scheduler` (as StepMesh launch scripts start one
    /// process of each kind from DMLC_* alone), the rendezvous server at
    /// the mesh's scheduler address.
    Run(RunArgs),
    /// Start a scheduler and M+N ranks on this host, run the workload,
    /// verify it, and compare with the floor.
    Bench(bench::BenchArgs),
    /// Work with the traces ranks write under AFMESH_TRACE.
    Trace {
        #[command(subcommand)]
        cmd: trace::TraceCmd,
    },
    /// One process of a floor exchange (used by `bench`).
    #[command(hide = true)]
    FloorPeer(floor::PeerArgs),
}

#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Tokens per attention rank per stage (the maximum, with --vary-tokens).
    #[arg(long, default_value_t = 128)]
    pub tokens: u32,
    /// Hidden size (elements per row).
    #[arg(long, default_value_t = 7168)]
    pub hidden: u32,
    /// Element type of dispatched rows.
    #[arg(long, value_enum, default_value_t = Elem::Fp8)]
    pub dispatch_dtype: Elem,
    /// Element type of combined rows.
    #[arg(long, value_enum, default_value_t = Elem::Bf16)]
    pub combine_dtype: Elem,
    /// Micro-batches in flight.
    #[arg(long, default_value_t = 3)]
    pub stages: u32,
    /// Timed layers.
    #[arg(long, default_value_t = 100)]
    pub iters: u32,
    /// Untimed warm-up layers.
    #[arg(long, default_value_t = 10)]
    pub warmup: u32,
    /// Vary token counts per rank, stage and layer between 0 and --tokens.
    #[arg(long)]
    pub vary_tokens: bool,
    /// Bound on every wait, milliseconds (at least 1).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// Receive into caller-owned memory (a buffer the rank allocates and
    /// hands to the library) instead of library-allocated slots.
    #[arg(long)]
    pub caller_buffers: bool,
    /// Where the ranks' stage buffers live: host memory, or GPUs (ranks
    /// round-robin over the visible GPUs; links over the cuda backend).
    #[arg(long, value_enum, default_value_t = DeviceArg::Host)]
    pub device: DeviceArg,
    /// With --device cuda: ranks produce each stage's rows on a stream of
    /// their own and dispatch / respond stream-ordered (the library's
    /// copies wait for that stream; the host never does).
    #[arg(long)]
    pub stream_ordered: bool,
    /// Where dispatches land on FFN ranks: a slot per attention rank, or
    /// one [M × tokens, row] matrix per stage (default: AFMESH_LAYOUT, else
    /// slots). FFN ranks read their input from the matrix then.
    #[arg(long, value_enum)]
    pub layout: Option<LayoutArg>,
    /// With --device cuda: rows are copied into the send slots by
    /// `dispatch_device` / `respond_device` (one copy within the GPU per
    /// message) instead of being written in place into them
    /// (`send_slot_device` + `dispatch_device_in_place`), for comparison.
    #[arg(long)]
    pub copy_rows: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutArg {
    Slots,
    Matrix,
}

impl LayoutArg {
    pub fn name(self) -> &'static str {
        match self {
            LayoutArg::Slots => "slots",
            LayoutArg::Matrix => "matrix",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Host,
    Cuda,
}

impl WorkloadArgs {
    pub fn workload(&self) -> Workload {
        Workload {
            tokens: self.tokens,
            hidden: self.hidden,
            dispatch: self.dispatch_dtype,
            combine: self.combine_dtype,
            stages: self.stages,
            warmup: self.warmup,
            iters: self.iters,
            vary_tokens: self.vary_tokens,
            timeout: Duration::from_millis(self.timeout_ms),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Role of this process (default: AFMESH_ROLE or DMLC_ROLE).
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
    /// Rendezvous server HOST:PORT (default: from the environment).
    #[arg(long)]
    scheduler: Option<String>,
    /// Attention ranks M.
    #[arg(long)]
    attention: Option<u32>,
    /// FFN ranks N.
    #[arg(long)]
    ffn: Option<u32>,
    /// Preferred rank.
    #[arg(long)]
    rank: Option<u32>,
    /// Print one JSON object with the results on stdout.
    #[arg(long)]
    json: bool,
    /// Do not announce joining on stderr.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    work: WorkloadArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RoleArg {
    Attention,
    Ffn,
    Scheduler,
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AFMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Scheduler {
            bind,
            token,
            token_file,
            attention,
            ffn,
            job,
            join_timeout,
            json,
        } => scheduler_token(token, token_file)
            .and_then(|t| scheduler(bind.as_deref(), t, attention, ffn, job, join_timeout, json)),
        Cmd::Run(args) => run(&args),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Trace { cmd } => trace::trace(&cmd),
        Cmd::FloorPeer(args) => floor::peer(&args),
    };
    if let Err(e) = r {
        eprintln!("afmesh: {e:#}");
        // Stopped by a signal: exit as a shell reports one.
        let code = afmesh::transport::shm::sys::terminated().map_or(1, |s| 128 + s);
        std::process::exit(code);
    }
}

/// The scheduler's token: the flags, else the environment ranks read too.
fn scheduler_token(
    token: Option<String>,
    file: Option<std::path::PathBuf>,
) -> Result<Option<Token>> {
    Ok(match (token, file) {
        (Some(t), _) => Some(Token::new(t).context("--token")?),
        (None, Some(f)) => Some(Token::from_file(&f).context("--token-file")?),
        (None, None) => MeshConfig::token_from_env()?,
    })
}

/// `--bind`: a bare port goes on loopback unless there is a token.
fn bind_address(bind: &str, has_token: bool) -> String {
    match bind.parse::<u16>() {
        Ok(port) if has_token => format!("0.0.0.0:{port}"),
        Ok(port) => format!("127.0.0.1:{port}"),
        Err(_) => bind.to_string(),
    }
}

/// `afmesh scheduler`: flags win, then the environment the ranks read
/// (so a StepMesh launch needs no flags), then the defaults.
fn scheduler(
    bind: Option<&str>,
    token: Option<Token>,
    attention: Option<u32>,
    ffn: Option<u32>,
    job: Option<String>,
    join_timeout: u64,
    json: bool,
) -> Result<()> {
    let env = MeshConfig::scheduler_from_env().context("reading the scheduler's environment")?;
    let (addr, from) = match (bind, env.addr) {
        (Some(b), _) => (bind_address(b, token.is_some()), "--bind"),
        (None, Some(a)) => (
            a,
            "AFMESH_SCHEDULER or DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT; --bind overrides it",
        ),
        (None, None) => (bind_address("8123", token.is_some()), "the default"),
    };
    let s = Scheduler::bind(
        &addr,
        SchedulerConfig {
            groups: env.groups,
            attention: attention.or(env.attention),
            ffn: ffn.or(env.ffn),
            job: job.or(env.job),
            join_timeout: Duration::from_secs(join_timeout),
            token,
            ..SchedulerConfig::default()
        },
    )
    .with_context(|| format!("listening on {addr} (from {from})"))?;
    serve(s, json)
}

/// Runs a bound rendezvous server until its mesh finishes, then prints
/// the job summary (`json`: as one JSON object).
fn serve(s: Scheduler, json: bool) -> Result<()> {
    eprintln!("afmesh scheduler listening on {}", s.local_addr()?);
    let summary = s.run()?;
    let meshes = match summary.groups {
        1 => "mesh".to_string(),
        g => format!("{g} instance groups, each a mesh"),
    };
    eprintln!(
        "afmesh scheduler: {meshes} {}A+{}F (epoch {:#x}) finished; {} stray connections dropped, {} failed the token, {} setup attempts failed before it",
        summary.attention,
        summary.ffn,
        summary.epoch,
        summary.dropped,
        summary.auth_failures,
        summary.failed_attempts
    );
    if !summary.reports.is_empty() {
        // Of several groups, the ranks are StepMesh's instance ranks.
        let g = summary.groups;
        let s = summary::gather(&summary.reports, summary.attention * g, summary.ffn * g);
        if json {
            println!("{}", s.json());
        } else {
            print!("{}", s.text());
        }
    }
    Ok(())
}

fn run(args: &RunArgs) -> Result<()> {
    // Flags win over the environment; the environment still supplies (and
    // validates) everything the flags leave out.
    let flag = |k: &str| -> Option<String> {
        match k {
            "AFMESH_SCHEDULER" => args.scheduler.clone(),
            "AFMESH_NUM_ATTENTION" => args.attention.map(|v| v.to_string()),
            "AFMESH_NUM_FFN" => args.ffn.map(|v| v.to_string()),
            "AFMESH_LAYOUT" => args.work.layout.map(|l| l.name().to_string()),
            _ => None,
        }
    };
    let mut cfg = MeshConfig::from_lookup(|k| flag(k).or_else(|| std::env::var(k).ok())).context(
        "configuring the rank (flags --scheduler/--attention/--ffn, or AFMESH_*/DMLC_* variables)",
    )?;
    if let Some(r) = args.role {
        (cfg.role, cfg.is_scheduler) = match r {
            RoleArg::Attention => (Some(Role::Attention), false),
            RoleArg::Ffn => (Some(Role::Ffn), false),
            RoleArg::Scheduler => (None, true),
        };
    }
    if cfg.is_scheduler {
        // The same launch line as the ranks: serve their rendezvous.
        let s = cfg.bind_scheduler().with_context(|| {
            format!(
                "listening on the mesh's scheduler address {}",
                cfg.scheduler
            )
        })?;
        return serve(s, args.json);
    }
    if args.rank.is_some() {
        cfg.rank = args.rank;
    }
    let w = args.work.workload();
    let spec = w.spec()?;
    w.check_memory(cfg.attention, cfg.ffn)?;
    let mesh = Mesh::new(cfg);
    let on_gpu = args.work.device == DeviceArg::Cuda;
    let rank = if on_gpu {
        let c = mesh.config();
        let role = c.role.context("--device cuda needs a role")?;
        // The GPU follows the rank: without a rank every process would
        // land on the same one.
        let r = c.rank.context(
            "--device cuda needs an explicit rank (--rank or AFMESH_RANK) to pick its GPU",
        )?;
        if args.work.caller_buffers {
            anyhow::bail!("--caller-buffers is for host memory; with --device cuda the library allocates device buffers");
        }
        let dev = device::device_of(role, r, c.attention)?;
        match role {
            Role::Attention => afmesh::Rank::Attention(mesh.attention_on_device(spec, dev)?),
            Role::Ffn => afmesh::Rank::Ffn(mesh.ffn_on_device(spec, dev)?),
        }
    } else if !args.work.caller_buffers {
        mesh.join(spec)?
    } else {
        match mesh.config().role {
            Some(afmesh::Role::Attention) => {
                let memory = caller_memory(mesh.attention_memory_len(spec)?)?;
                afmesh::Rank::Attention(mesh.attention_with_region(spec, memory)?)
            }
            Some(afmesh::Role::Ffn) => {
                let memory = caller_memory(mesh.ffn_memory_len(spec)?)?;
                afmesh::Rank::Ffn(mesh.ffn_with_region(spec, memory)?)
            }
            None => mesh.join(spec)?,
        }
    };
    match rank {
        afmesh::Rank::Attention(mut a) => {
            announce(
                args,
                format!("A{}", a.rank()),
                a.attention_ranks(),
                a.ffn_ranks(),
            );
            let started = std::time::Instant::now();
            let rep = if on_gpu {
                device::run_attention(&mut a, &w, args.work.stream_ordered, args.work.copy_rows)?
            } else {
                workload::run_attention(&mut a, &w)?
            };
            let elapsed = started.elapsed().as_secs_f64();
            let rank = a.rank();
            let stats = a.stats();
            let (rejected, transport) = (stats.rejected(), stats.transport.clone());
            let (sent, copied) = moved(&stats);
            let stragglers = stats.stragglers();
            let line = format!(
                "{{\"role\":\"attention\",\"transport\":\"{transport}\",\"rank\":{rank},\"errors\":{},\"rejected\":{rejected},\"sent_bytes\":{sent},\"copied_bytes\":{copied},\"ffn_us\":{:.3},\"net_us\":{:.3},\"first_error\":{},\"elapsed_s\":{elapsed:.6},\"wire\":{},\"links\":{},\"stragglers\":{},\"lat_ns\":{}}}",
                rep.errors,
                rep.ffn_us,
                rep.net_us,
                json_str(rep.first_error.as_deref()),
                wire_json(&stats, &rep.timed_from),
                links_json(&stats),
                stragglers_json(&stragglers),
                bench::words_json(&rep.lat)
            );
            report(a.report(&line));
            a.shutdown()?;
            if args.json {
                println!("{line}");
            } else {
                let p50 = bench::Summary::of(&rep.lat).p50;
                println!(
                    "A{rank}: {} layers, p50 {p50:.1} us, {} verification errors",
                    rep.lat.count(),
                    rep.errors
                );
                for s in stragglers.iter().take(3) {
                    println!(
                        "  straggler {}: last in {} stages, {:.1} us after the one before (mean), {:.1} us at most",
                        s.peer,
                        s.count,
                        s.mean_late_ns / 1e3,
                        s.max_late_ns as f64 / 1e3
                    );
                }
            }
            if rep.errors > 0 {
                anyhow::bail!(
                    "A{rank}: {} verification errors; first: {}",
                    rep.errors,
                    rep.first_error.unwrap_or_default()
                );
            }
        }
        afmesh::Rank::Ffn(mut f) => {
            announce(
                args,
                format!("F{}", f.rank()),
                f.attention_ranks(),
                f.ffn_ranks(),
            );
            let started = std::time::Instant::now();
            let rep = if on_gpu {
                device::run_ffn(&mut f, &w, args.work.stream_ordered, args.work.copy_rows)?
            } else {
                workload::run_ffn(&mut f, &w)?
            };
            let elapsed = started.elapsed().as_secs_f64();
            let rank = f.rank();
            let stats = f.stats();
            let rejected = stats.rejected();
            let (sent, copied) = moved(&stats);
            let line = format!(
                "{{\"role\":\"ffn\",\"transport\":\"{}\",\"rank\":{rank},\"batches\":{},\"errors\":{},\"rejected\":{rejected},\"sent_bytes\":{sent},\"copied_bytes\":{copied},\"first_error\":{},\"elapsed_s\":{elapsed:.6},\"wire\":{},\"links\":{}}}",
                stats.transport,
                rep.batches,
                rep.errors,
                json_str(rep.first_error.as_deref()),
                wire_json(&stats, &rep.timed_from),
                links_json(&stats)
            );
            report(f.report(&line));
            f.shutdown()?;
            if args.json {
                println!("{line}");
            } else {
                println!(
                    "F{rank}: {} batches, {} verification errors",
                    rep.batches, rep.errors
                );
            }
            if rep.errors > 0 {
                anyhow::bail!(
                    "F{rank}: {} verification errors; first: {}",
                    rep.errors,
                    rep.first_error.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// Per peer: bytes sent, and the round trips (attention ranks) or FFN
/// processing times it saw, as histogram words.
fn links_json(stats: &afmesh::RankStats) -> String {
    let links: Vec<String> = stats
        .peers
        .iter()
        .map(|(peer, p)| {
            let mut o = format!("{{\"peer\":\"{peer}\",\"sent_bytes\":{}", p.sent_bytes);
            // Only what this role measures (keeps the report small).
            for (k, h) in [
                ("rt_ns", &p.round_trip_ns),
                ("ffn_ns", &p.ffn_ns),
                ("arr_ns", &p.arrival_ns),
            ] {
                if !h.is_empty() {
                    o += &format!(",\"{k}\":{}", bench::words_json(h));
                }
            }
            o + "}"
        })
        .collect();
    format!("[{}]", links.join(","))
}

/// A report the scheduler did not take is worth a warning, not a failure:
/// the run itself succeeded.
fn report(r: afmesh::Result<()>) {
    if let Err(e) = r {
        tracing::warn!("results not reported to the scheduler: {e}");
    }
}

/// Bytes this rank sent to all its peers, and the bytes the library
/// itself copied: into its send slots, into peers (shm), and out of a
/// read-ahead inbox on receipt (tcp's small bodies).
fn moved(stats: &afmesh::RankStats) -> (u64, u64) {
    stats
        .peers
        .iter()
        .fold((0, stats.wire.received_copied_bytes), |(s, c), (_, p)| {
            (s + p.sent_bytes, c + p.copied_bytes)
        })
}

/// The transport's post-path counters, and the spin gaps of the timed
/// layers (counted since `timed_from`), as a JSON object.
fn wire_json(stats: &afmesh::RankStats, timed_from: &afmesh::transport::Gaps) -> String {
    let g = stats.spin_gaps.since(timed_from);
    let w = &stats.wire;
    let rails = usize::from(w.rails).min(w.rail_messages.len());
    let list = |v: &[u64]| {
        let v: Vec<String> = v[..rails].iter().map(u64::to_string).collect();
        v.join(",")
    };
    format!(
        "{{\"messages\":{},\"work_requests\":{},\"signaled\":{},\"flushes\":{},\"registrations_after_setup\":{},\"rails\":{rails},\"rail_messages\":[{}],\"rail_bytes\":[{}],\"preempted_spins\":{},\"spun_us\":{},\"spin_gaps\":{},\"spin_gap_us\":{}}}",
        w.messages, w.work_requests, w.signaled, w.flushes, w.registrations_after_setup,
        list(&w.rail_messages), list(&w.rail_bytes), w.preempted_spins,
        g.spun_ns / 1000, g.count, g.lost_ns / 1000
    )
}

fn announce(args: &RunArgs, who: String, m: usize, n: usize) {
    if !args.quiet {
        eprintln!("afmesh run: {who} joined a {m}A+{n}F mesh");
    }
}

/// Stragglers as a JSON array: `[{"peer":"F1","count":3,"mean_late_us":1.5,"max_late_us":4.0}]`.
pub fn stragglers_json(v: &[afmesh::Straggler]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|s| {
            format!(
                "{{\"peer\":\"{}\",\"count\":{},\"mean_late_us\":{:.3},\"max_late_us\":{:.3}}}",
                s.peer,
                s.count,
                s.mean_late_ns / 1e3,
                s.max_late_ns as f64 / 1e3
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

pub fn json_str(s: Option<&str>) -> String {
    match s {
        None => "null".into(),
        Some(s) => {
            let mut o = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        }
    }
}

/// Caller receive memory as the library's docs advise: `len` bytes rounded
/// up to whole huge pages, starting on a huge-page boundary, so that peers
/// on this host write all of it at memcpy speed (on 4 KiB pages each write
/// pins the target page by page).
fn caller_memory(len: usize) -> Result<afmesh::transport::Region> {
    let page = afmesh::transport::Region::huge_page_size().max(64);
    let size = len.div_ceil(page) * page;
    let v = vec![0u8; size + page];
    let start = v.as_ptr() as usize;
    let offset = start.next_multiple_of(page) - start;
    afmesh::transport::Region::from_vec_part(v, offset, size).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::bind_address;

    #[test]
    fn a_bare_port_binds_loopback_unless_there_is_a_token() {
        assert_eq!(bind_address("8123", false), "127.0.0.1:8123");
        assert_eq!(bind_address("0", true), "0.0.0.0:0");
        assert_eq!(bind_address("10.0.0.1:9", false), "10.0.0.1:9");
    }
}
