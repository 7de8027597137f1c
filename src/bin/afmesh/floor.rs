//! The floors `afmesh bench` sets beside its mesh: the same layer's bytes
//! moved the plainest way this machine allows, measured in the same run.
//!
//! * **tcp exchange**: M attention and N FFN processes (this binary's
//!   hidden `floor-peer` command). Each attention process holds one
//!   blocking `TCP_NODELAY` connection per FFN process; per layer it
//!   writes its dispatch bytes on every connection, then reads every
//!   reply. Each FFN process serves each connection on a thread of its
//!   own: read the attention rank's bytes, write the combine reply.
//! * **tcp exchange, polled**: the same, with non-blocking sockets whose
//!   callers spin (then yield) on `WouldBlock` instead of sleeping in the
//!   kernel. The mesh's ranks spin before they park; a floor that always
//!   sleeps pays a wake-up per socket-buffer's worth of bytes (on a busy
//!   host, a scheduling delay each), so it may be the slower plain way.
//! * **shm exchange**: the same M+N processes over one shared mapping with
//!   a mailbox per pair ([`mailbox`]): the attention process copies each
//!   stage's bytes into the pair's buffer and raises a flag; the FFN
//!   process, spinning (then yielding, unless pinned) on its flags, copies
//!   its reply back and raises the attention's flag. Stages are separate
//!   messages, so the FFN answers one while the next is copied in, as the
//!   mesh's stages overlap. The receivers read what they get as the
//!   mesh's workload does: the FFN process one word per token row (the
//!   word its reply row carries back), the attention process every byte
//!   of the replies, after the layer's time is taken. Without those reads
//!   no received byte ever leaves its writer's cache (the buffers' lines
//!   stay where they were written), so that variant (still measured,
//!   `--no-read`, and reported beside it) moves flags between the cores
//!   but not the layer.
//! * **plain verbs exchange** (`floor/verbs.rs`): the same M+N processes,
//!   one RC QP per pair, each stage message one signalled
//!   write-with-imm each way, CQs busy-polled, no library logic.
//! * **memcpy**: one thread copying a layer's bytes once, with no second
//!   process and no flag — the least any shared-memory transport pays.
//!
//! The bytes per (attention, FFN) pair and layer are what the mesh sends
//! per pair over all its stages, headers included: over tcp in one message
//! each way (a blocking writer that reads nothing until it has written
//! everything cannot take replies to early stages without risking a
//! deadlock on full socket buffers), over shm split evenly into one message
//! per stage. Every process is pinned as the mesh's ranks are, and every
//! wait is bounded by the workload's timeout.

mod mailbox;
mod shm;
pub mod verbs;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use afmesh::transport::shm::sys::{self, Mapping};
use anyhow::{bail, Context, Result};
use clap::Args;

use afmesh::Histogram;

use crate::bench::{lat_of, wait_all, words_json, Children};
use mailbox::{Layout, Mailboxes};

/// The CPU of `role`'s rank `rank` among `n` FFN ranks: FFN ranks first,
/// then attention ranks, taking `cpus` in turn and wrapping round; `None`
/// when `cpus` is empty. The mesh's ranks and the floors' processes are
/// placed alike.
pub fn rank_cpu(cpus: &[usize], n: u32, role: &str, rank: u32) -> Option<usize> {
    if cpus.is_empty() {
        return None;
    }
    let slot = if role == "ffn" { rank } else { n + rank } as usize;
    Some(cpus[slot % cpus.len()])
}

/// One exchange floor to measure: the mesh's shape, its bytes per pair and
/// its pinning.
#[derive(Debug, Clone)]
pub struct Plan {
    pub m: u32,
    pub n: u32,
    /// Per attention rank: bytes it sends each FFN rank per layer.
    pub dispatch: Vec<u64>,
    /// Per attention rank: bytes each FFN rank sends it back per layer.
    pub combine: Vec<u64>,
    /// Messages per pair and layer, each way (shm; tcp sends one).
    pub stages: u32,
    /// Bytes of a token row out and back (the shm floor's receivers read
    /// one word per row of what they get, as the workload does).
    pub rows: (u64, u64),
    pub warmup: u32,
    pub iters: u32,
    pub timeout: Duration,
    /// CPUs to pin to, taken in turn (FFN ranks first, then attention, as
    /// the mesh does); `None`: not pinned.
    pub cpus: Option<Vec<usize>>,
}

impl Plan {
    fn cpu(&self, role: &str, rank: u32) -> Option<usize> {
        rank_cpu(self.cpus.as_deref()?, self.n, role, rank)
    }

    fn budget(&self) -> Duration {
        Duration::from_secs(60) + Duration::from_millis(u64::from(self.warmup + self.iters) * 50)
    }

    fn command(&self, transport: &str, role: &str, rank: u32) -> Result<Command> {
        let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new(std::env::current_exe().context("locating the afmesh binary")?);
        cmd.args(["floor-peer", "--transport", transport, "--role", role])
            .args(["--rank", &rank.to_string()])
            .args(["--attention", &self.m.to_string()])
            .args(["--ffn", &self.n.to_string()])
            .args(["--dispatch", &list(&self.dispatch)])
            .args(["--combine", &list(&self.combine)])
            .args(["--stages", &self.stages.to_string()])
            .args(["--row", &self.rows.0.to_string()])
            .args(["--out-row", &self.rows.1.to_string()])
            .args(["--warmup", &self.warmup.to_string()])
            .args(["--iters", &self.iters.to_string()])
            .args(["--timeout-ms", &self.timeout.as_millis().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(cpu) = self.cpu(role, rank) {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        Ok(cmd)
    }

    /// Every attention process's time for each timed layer, merged.
    fn collect(&self, outs: &[String]) -> Result<Histogram> {
        let per_rank: Vec<Histogram> = outs
            .iter()
            .filter_map(|o| o.lines().last().and_then(lat_of))
            .collect();
        if per_rank.len() != self.m as usize {
            bail!(
                "floor: expected {} attention reports, got {}",
                self.m,
                per_rank.len()
            );
        }
        Ok(per_rank.iter().fold(Histogram::new(), |mut all, h| {
            all.merge(h);
            all
        }))
    }
}

/// Per-layer microseconds of the tcp exchange floor; `polled`: its
/// sockets are non-blocking and waits spin.
pub fn tcp(plan: &Plan, polled: bool) -> Result<Histogram> {
    let deadline = Instant::now() + plan.budget();
    let mut children = Children(Vec::new());
    let mut addrs = Vec::new();
    for f in 0..plan.n {
        let mut cmd = plan.command("tcp", "ffn", f)?;
        if polled {
            cmd.arg("--poll");
        }
        let out = children
            .spawn(format!("tcp floor F{f}"), &mut cmd)?
            .stdout
            .take();
        let line = first_line(out, plan.timeout).with_context(|| format!("tcp floor F{f}"))?;
        match line.strip_prefix("listening ") {
            Some(a) => addrs.push(a.trim().to_string()),
            None => bail!("tcp floor F{f} said {line:?}, not where it listens"),
        }
    }
    let connect = addrs.join(",");
    for a in 0..plan.m {
        let mut cmd = plan.command("tcp", "attention", a)?;
        if polled {
            cmd.arg("--poll");
        }
        children.spawn(format!("tcp floor A{a}"), cmd.args(["--connect", &connect]))?;
    }
    let outs = wait_all(&mut children, deadline)?;
    plan.collect(&outs)
}

/// Per-layer microseconds of the shared-memory exchange floor; `read`:
/// its receivers read what they get, as the mesh's workload does.
pub fn shm(plan: &Plan, read: bool) -> Result<Histogram> {
    let layout = Layout::new(
        plan.m as usize,
        plan.n as usize,
        &plan.dispatch,
        &plan.combine,
    )?;
    let name = format!("afmesh.bench-{}.floor", std::process::id());
    // The name lives until the peers are done; the mapping itself is theirs.
    drop(Mapping::create(&name, layout.len()).with_context(|| format!("creating {name}"))?);
    let _unlink = Unlink(name.clone());
    let deadline = Instant::now() + plan.budget();
    let mut children = Children(Vec::new());
    for (role, count) in [("ffn", plan.n), ("attention", plan.m)] {
        for r in 0..count {
            let mut cmd = plan.command("shm", role, r)?;
            if !read {
                cmd.arg("--no-read");
            }
            children.spawn(
                format!("shm floor {role} {r}"),
                cmd.args(["--segment", &name]),
            )?;
        }
    }
    let outs = wait_all(&mut children, deadline)?;
    plan.collect(&outs)
}

/// Removes a segment's name on every path out.
struct Unlink(String);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = sys::unlink(&self.0);
    }
}

/// The first line a child writes, within `timeout`; the rest of its output
/// is drained (and dropped) so it never blocks on a full pipe.
fn first_line(out: Option<std::process::ChildStdout>, timeout: Duration) -> Result<String> {
    let out = out.context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let got = r.read_line(&mut line).map(|_| line);
        let _ = tx.send(got);
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(l)) if !l.is_empty() => Ok(l),
        Ok(Ok(_)) => bail!("exited before saying where it listens"),
        Ok(Err(e)) => Err(e).context("reading its output"),
        Err(_) => bail!("did not say where it listens within {timeout:?}"),
    }
}

/// Per-iteration nanoseconds of copying a layer's bytes once, from one
/// buffer to another, on one thread.
pub fn memcpy(dispatch: u64, combine: u64, iters: u32) -> Histogram {
    let src_d = vec![0x5au8; dispatch as usize];
    let src_c = vec![0xa5u8; combine as usize];
    let mut dst_d = vec![0u8; dispatch as usize];
    let mut dst_c = vec![0u8; combine as usize];
    let warm = 5.min(iters);
    let mut v = Histogram::new();
    for i in 0..iters {
        let t = Instant::now();
        dst_d.copy_from_slice(std::hint::black_box(&src_d));
        dst_c.copy_from_slice(std::hint::black_box(&src_c));
        std::hint::black_box((&dst_d, &dst_c));
        if i >= warm {
            v.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerTransport {
    Tcp,
    Shm,
    Verbs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerRole {
    Attention,
    Ffn,
}

/// One process of an exchange floor (the hidden `floor-peer` command).
#[derive(Args, Debug, Clone)]
pub struct PeerArgs {
    #[arg(long, value_enum)]
    transport: PeerTransport,
    #[arg(long, value_enum)]
    role: PeerRole,
    #[arg(long)]
    rank: u32,
    #[arg(long)]
    attention: u32,
    #[arg(long)]
    ffn: u32,
    /// Per attention rank: bytes it sends each FFN rank per layer.
    #[arg(long, value_delimiter = ',')]
    dispatch: Vec<u64>,
    /// Per attention rank: bytes each FFN rank answers it with per layer.
    #[arg(long, value_delimiter = ',')]
    combine: Vec<u64>,
    /// Messages per pair and layer, each way (shm).
    #[arg(long, default_value_t = 1)]
    stages: u32,
    /// Bytes of a dispatched token row (shm: the FFN reads a word per row).
    #[arg(long, default_value_t = 0)]
    row: u64,
    /// Bytes of a combined token row (shm: the FFN writes a word per row).
    #[arg(long, default_value_t = 0)]
    out_row: u64,
    /// Shm: receivers do not read what they get (the bytes stay in their
    /// writer's cache).
    #[arg(long)]
    no_read: bool,
    #[arg(long)]
    warmup: u32,
    #[arg(long)]
    iters: u32,
    #[arg(long)]
    timeout_ms: u64,
    /// The FFN processes' addresses, by rank (tcp attention side).
    #[arg(long, value_delimiter = ',')]
    connect: Vec<String>,
    /// The shared segment's name (shm).
    #[arg(long)]
    segment: Option<String>,
    /// Pin this process to a CPU (its waits then spin without yielding).
    #[arg(long)]
    cpu: Option<usize>,
    /// Tcp: non-blocking sockets, waits spin instead of sleeping.
    #[arg(long)]
    poll: bool,
}

impl PeerArgs {
    fn layers(&self) -> u32 {
        self.warmup.saturating_add(self.iters)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// (dispatch, combine) bytes of attention rank `a`'s pairs.
    fn sizes(&self, a: usize) -> (usize, usize) {
        (self.dispatch[a] as usize, self.combine[a] as usize)
    }
}

/// Runs one floor process; an attention process prints its timed layers
/// as `{"lat_ns":[...]}` (a histogram, [`words_json`]).
pub fn peer(args: &PeerArgs) -> Result<()> {
    let (m, n) = (args.attention as usize, args.ffn as usize);
    if args.dispatch.len() != m || args.combine.len() != m {
        bail!("floor peer: {m} attention ranks need {m} dispatch and combine sizes");
    }
    let own = match args.role {
        PeerRole::Attention => m,
        PeerRole::Ffn => n,
    };
    if args.stages == 0 {
        bail!("floor peer: --stages 0");
    }
    if args.rank as usize >= own {
        bail!("floor peer: rank {} of {own}", args.rank);
    }
    if let Some(cpu) = args.cpu {
        // Before any thread starts: tcp serving threads inherit the pin
        // (a mesh rank has one thread; the floor's FFN side has one per
        // connection, and they share the rank's core like it).
        sys::pin_to_cpu(cpu).with_context(|| format!("pinning to CPU {cpu}"))?;
    }
    let lat = match (args.transport, args.role) {
        (PeerTransport::Verbs, _) => return verbs::peer(args),
        (PeerTransport::Tcp, PeerRole::Ffn) => return tcp_ffn(args),
        (PeerTransport::Tcp, PeerRole::Attention) => tcp_attention(args)?,
        (PeerTransport::Shm, role) => {
            let name = args.segment.as_deref().context("--segment is required")?;
            let layout = Layout::new(m, n, &args.dispatch, &args.combine)?;
            let map = Mapping::open(name).with_context(|| format!("opening {name}"))?;
            let boxes = Mailboxes::new(map, layout)?;
            match role {
                PeerRole::Ffn => return shm::ffn(args, &boxes),
                PeerRole::Attention => shm::attention(args, &boxes)?,
            }
        }
    };
    println!("{{\"lat_ns\":{}}}", words_json(&lat));
    Ok(())
}

fn configure(s: &TcpStream, timeout: Duration) -> Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(())
}

/// A floor connection: blocking (the kernel's timeouts bound each call),
/// or non-blocking with spinning waits bounded by a [`Waiter`].
struct Conn {
    s: TcpStream,
    /// `Some` when polled: (pinned, timeout) for each wait's `Waiter`.
    poll: Option<(bool, Duration)>,
}

impl Conn {
    fn new(s: TcpStream, args: &PeerArgs) -> Result<Conn> {
        configure(&s, args.timeout())?;
        if args.poll {
            s.set_nonblocking(true)?;
        }
        Ok(Conn {
            s,
            poll: args.poll.then_some((args.cpu.is_some(), args.timeout())),
        })
    }

    fn write_all(&mut self, mut buf: &[u8]) -> Result<()> {
        let Some((pinned, timeout)) = self.poll else {
            return Ok(self.s.write_all(buf)?);
        };
        let mut w = Waiter::new(pinned, timeout);
        while !buf.is_empty() {
            match self.s.write(buf) {
                Ok(0) => bail!("the socket took no bytes"),
                Ok(k) => {
                    buf = &buf[k..];
                    w.progressed();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    w.relax(|| "room in the socket".into())?
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<()> {
        let Some((pinned, timeout)) = self.poll else {
            return Ok(self.s.read_exact(buf)?);
        };
        let mut w = Waiter::new(pinned, timeout);
        while !buf.is_empty() {
            match self.s.read(buf) {
                Ok(0) => bail!("the peer closed the connection"),
                Ok(k) => {
                    buf = &mut buf[k..];
                    w.progressed();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    w.relax(|| "bytes from the peer".into())?
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

fn tcp_attention(args: &PeerArgs) -> Result<Histogram> {
    let me = args.rank as usize;
    if args.connect.len() != args.ffn as usize {
        bail!(
            "floor peer: {} addresses for {} FFN ranks",
            args.connect.len(),
            args.ffn
        );
    }
    let mut conns = Vec::with_capacity(args.connect.len());
    for (f, a) in args.connect.iter().enumerate() {
        let addr: SocketAddr = a.parse().with_context(|| format!("address {a:?}"))?;
        let s = TcpStream::connect_timeout(&addr, args.timeout())
            .with_context(|| format!("connecting to F{f} at {addr}"))?;
        let mut conn = Conn::new(s, args)?;
        conn.write_all(&args.rank.to_le_bytes())
            .with_context(|| format!("greeting F{f}"))?;
        conns.push(conn);
    }
    let (d, c) = args.sizes(me);
    let out = vec![0x5au8; d];
    let mut back = vec![0u8; c];
    // Fixed size, whatever --iters is.
    let mut lat = Histogram::new();
    for layer in 0..args.layers() {
        let t = Instant::now();
        for (f, s) in conns.iter_mut().enumerate() {
            s.write_all(&out)
                .with_context(|| format!("layer {layer}: writing to F{f}"))?;
        }
        for (f, s) in conns.iter_mut().enumerate() {
            s.read_exact(&mut back)
                .with_context(|| format!("layer {layer}: reading from F{f}"))?;
        }
        if layer >= args.warmup {
            lat.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(lat)
}

fn tcp_ffn(args: &PeerArgs) -> Result<()> {
    let m = args.attention as usize;
    let l = TcpListener::bind("127.0.0.1:0")?;
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + args.timeout();
    let mut seen = vec![false; m];
    let mut servers = Vec::with_capacity(m);
    while servers.len() < m {
        let s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                // Setup only, before any timed layer: a coarse poll is fine.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(e).context("attention floor peers did not all connect"),
        };
        s.set_nonblocking(false)?;
        let mut s = Conn::new(s, args)?;
        let mut hello = [0u8; 4];
        s.read_exact(&mut hello).context("reading a hello")?;
        let a = u32::from_le_bytes(hello) as usize;
        if a >= m || std::mem::replace(&mut seen[a], true) {
            bail!("floor peer: unexpected hello from attention rank {a}");
        }
        let (d, c) = args.sizes(a);
        let layers = args.layers();
        servers.push(std::thread::spawn(move || -> Result<()> {
            let mut inb = vec![0u8; d];
            let out = vec![0xa5u8; c];
            for layer in 0..layers {
                s.read_exact(&mut inb)
                    .with_context(|| format!("layer {layer}: reading from A{a}"))?;
                s.write_all(&out)
                    .with_context(|| format!("layer {layer}: writing to A{a}"))?;
            }
            Ok(())
        }));
    }
    for h in servers {
        h.join()
            .map_err(|_| anyhow::anyhow!("a floor serving thread panicked"))??;
    }
    Ok(())
}

/// Spins on a flag, then yields between looks (the box may have fewer
/// cores than processes) unless pinned; fails after the timeout.
struct Waiter {
    looks: u32,
    pinned: bool,
    deadline: Instant,
}

/// Looks spent spinning before an unpinned waiter starts yielding: about
/// the few microseconds a reply already on its way takes.
const SPIN_LOOKS: u32 = 256;

impl Waiter {
    fn new(pinned: bool, timeout: Duration) -> Waiter {
        Waiter {
            looks: 0,
            pinned,
            deadline: Instant::now() + timeout,
        }
    }

    /// Something arrived: spin again before yielding on the next wait.
    fn progressed(&mut self) {
        self.looks = 0;
    }

    fn relax(&mut self, what: impl FnOnce() -> String) -> Result<()> {
        self.looks = self.looks.wrapping_add(1);
        if self.looks.is_multiple_of(64) && Instant::now() > self.deadline {
            bail!("timed out waiting for {}", what());
        }
        if self.pinned || self.looks < SPIN_LOOKS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
        Ok(())
    }
}

/// (offset, length) of each of `stages` messages that split `total` bytes
/// as evenly as they can.
fn parts(total: usize, stages: u32) -> Vec<(usize, usize)> {
    let s = stages as usize;
    let mut at = 0;
    (0..s)
        .map(|i| {
            let len = total / s + usize::from(i < total % s);
            at += len;
            (at - len, len)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{parts, Plan};
    use std::time::Duration;

    #[test]
    fn ranks_are_pinned_to_the_cpus_the_job_was_given_in_turn() {
        let mut plan = Plan {
            m: 2,
            n: 2,
            dispatch: vec![1, 1],
            combine: vec![1, 1],
            stages: 1,
            rows: (0, 0),
            warmup: 0,
            iters: 1,
            timeout: Duration::from_secs(1),
            cpus: Some(vec![8, 9, 12]),
        };
        // FFN ranks first, then attention ranks, wrapping round the set.
        assert_eq!(plan.cpu("ffn", 0), Some(8));
        assert_eq!(plan.cpu("ffn", 1), Some(9));
        assert_eq!(plan.cpu("attention", 0), Some(12));
        assert_eq!(plan.cpu("attention", 1), Some(8));
        plan.cpus = Some(Vec::new());
        assert_eq!(plan.cpu("ffn", 0), None);
        plan.cpus = None;
        assert_eq!(plan.cpu("attention", 0), None);
    }

    #[test]
    fn parts_cover_the_bytes_in_order() {
        for (total, stages) in [(10, 3), (3, 3), (2, 3), (7168, 1), (0, 2)] {
            let p = parts(total, stages);
            assert_eq!(p.len(), stages as usize);
            assert_eq!(p.iter().map(|x| x.1).sum::<usize>(), total);
            let mut at = 0;
            for &(off, len) in &p {
                assert_eq!(off, at);
                at += len;
            }
            let (lo, hi) = (p.iter().map(|x| x.1).min(), p.iter().map(|x| x.1).max());
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{p:?}");
        }
    }
}
