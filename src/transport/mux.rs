//! One rank's links over several backends, and the one wait.
//!
//! The mux holds a rank's backends in preference order
//! ([`BACKENDS`](super::BACKENDS), or
//! the one `AFMESH_TRANSPORT` forces), registers every region with each
//! backend that can move its memory kind, and gives each peer one link on
//! the first backend that reaches it (both ends choose from the same two
//! endpoint lists, so they agree). Link ids are the mux's own, in the order
//! links came up.
//!
//! [`Mux::poll`] is the only waiting loop of the library: make progress on
//! every backend; spin under the [`PollPolicy`]; then park on what the
//! backends expose — the shared-memory doorbell (with a watcher thread that
//! rings it for sockets, when a rank has both), socket descriptors with
//! `poll(2)`, or a backend's own park — in slices of at most
//! [`MAX_PARK`], so that liveness checks run while parked too.
//!
//! Spinning only pays on a core the rank has to itself. When a spin is
//! interrupted by a preemption (a gap of [`PREEMPTED_GAP`](super::poll::PREEMPTED_GAP) between two
//! looks at the clock, and the thread's involuntary context switches went
//! up), another task wants this core: the wait parks at once, and the
//! waits of the next [`QUIET`](super::poll::QUIET) (doubling while it keeps happening, up to
//! [`MAX_QUIET`](super::poll::MAX_QUIET)) park without spinning. A parked thread is woken when
//! its message comes, on an idle core if one is free; a spinning one that
//! yields hands the other task a whole time slice (milliseconds). Only the
//! yielding default does this: a rank pinned to its own core and
//! `AFMESH_POLL=spin` keep spinning whatever happens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::poll::{Contention, Gaps, PREEMPTED_GAP};
use super::shm::sys::{poll_ready, FdWatcher};
use super::{
    Access, Backend, Caps, Completion, Connected, LinkId, LocalKey, LocalSlice, MemoryKind,
    PeerSpec, PollPolicy, Region, RegionKey, Transport, Wake,
};
use crate::error::{Error, Result};

/// Longest single park, so liveness and deadlines are checked while parked.
pub const MAX_PARK: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy)]
struct Route {
    backend: usize,
    link: LinkId,
}

/// A rank's backends and links.
#[derive(Debug)]
pub struct Mux {
    backends: Vec<Backend>,
    /// Local key per (mux region, backend); `None` where the backend does
    /// not move that memory.
    locals: Vec<Vec<Option<LocalKey>>>,
    routes: Vec<Route>,
    /// Mux link id per (backend, backend link).
    back: Vec<Vec<LinkId>>,
    policy: PollPolicy,
    tmp: Vec<Completion>,
    watcher: Option<FdWatcher>,
    watched: usize,
    slices: Vec<LocalSlice>,
    /// The backend that carries every link, when its link ids are the
    /// mux's own: progress then reports straight into the caller's list.
    direct: Option<usize>,
    /// Spinning after preemptions: see the module docs.
    contention: Contention,
    /// What the machine took from spinning waits.
    gaps: Gaps,
}

impl Mux {
    /// A mux over `backends`, most preferred first.
    pub fn new(backends: Vec<Backend>, policy: PollPolicy) -> Mux {
        let n = backends.len();
        Mux {
            backends,
            locals: Vec::new(),
            routes: Vec::new(),
            back: vec![Vec::new(); n],
            policy,
            tmp: Vec::with_capacity(64),
            watcher: None,
            watched: 0,
            slices: Vec::with_capacity(4),
            direct: None,
            contention: Contention {
                seen: crate::transport::shm::sys::preemptions().unwrap_or(0),
                ..Contention::default()
            },
            gaps: Gaps::default(),
        }
    }

    /// How many waits stopped spinning because the thread was preempted
    /// (its core is shared with another busy task).
    pub fn preempted_spins(&self) -> u64 {
        self.contention.preempted
    }

    /// The backends, most preferred first.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Mutable access to the backends (setup only).
    pub fn backends_mut(&mut self) -> &mut [Backend] {
        &mut self.backends
    }

    /// Registers `region` with every backend that moves its kind of memory;
    /// the mux's local key names it in [`Mux::post_write`]. An error if no
    /// backend can move it. Device memory that one of several backends
    /// cannot register (verbs on a host without GPUDirect RDMA) takes that
    /// backend out of the mux, logged, so its links go to the others; call
    /// this before the first link and before publishing endpoints.
    pub fn register(&mut self, region: &Arc<Region>, access: Access) -> Result<LocalKey> {
        let kind = region.kind();
        let mut keys = Vec::with_capacity(self.backends.len());
        let mut refused = Vec::new();
        for (i, b) in self.backends.iter_mut().enumerate() {
            keys.push(if b.caps().moves(kind) {
                match b.register(region, access) {
                    Ok(r) => Some(r.local),
                    Err(e) if kind != MemoryKind::Host && self.routes.is_empty() => {
                        refused.push((i, e));
                        None
                    }
                    Err(e) => return Err(e),
                }
            } else {
                None
            });
        }
        if keys.iter().all(Option::is_none) {
            if let Some((_, e)) = refused.pop() {
                // The only candidate refused it: that error is the reason.
                if refused.is_empty() {
                    return Err(e);
                }
                let mut why: Vec<String> = refused
                    .iter()
                    .map(|(i, e)| format!("{}: {e}", self.backends[*i].name()))
                    .collect();
                why.push(e.to_string());
                return Err(Error::Unsupported(format!(
                    "no transport of this rank registers {kind}: {}",
                    why.join("; ")
                )));
            }
            let names: Vec<&str> = self.backends.iter().map(|b| b.name()).collect();
            return Err(Error::Unsupported(format!(
                "no transport of this rank ({}) moves {kind}",
                names.join(", ")
            )));
        }
        self.locals.push(keys);
        for (i, e) in refused.into_iter().rev() {
            tracing::warn!(
                "transport {} cannot register {kind}, links will use the others: {e}",
                self.backends[i].name()
            );
            self.backends.remove(i);
            self.back.remove(i);
            for k in &mut self.locals {
                k.remove(i);
            }
        }
        Ok(LocalKey((self.locals.len() - 1) as u32))
    }

    /// Each backend's endpoint blob, by name.
    pub fn endpoints(&self) -> Vec<(String, Vec<u8>)> {
        self.backends
            .iter()
            .map(|b| (b.name().to_string(), b.endpoint()))
            .collect()
    }

    /// Which backend links to a peer that published `endpoints`: the first
    /// of ours that the peer also offers and that reaches it. The error
    /// lists why each was passed over.
    pub fn choose(&self, endpoints: &[(String, Vec<u8>)]) -> std::result::Result<usize, String> {
        self.choose_why(endpoints).map(|(i, _)| i)
    }

    /// As [`Mux::choose`], also saying why the more preferred backends
    /// were passed over (empty when the first was taken).
    pub fn choose_why(
        &self,
        endpoints: &[(String, Vec<u8>)],
    ) -> std::result::Result<(usize, String), String> {
        let mut why = Vec::new();
        for (i, b) in self.backends.iter().enumerate() {
            match endpoints.iter().find(|(n, _)| n == b.name()) {
                None => why.push(format!("{}: the peer does not offer it", b.name())),
                Some((_, blob)) => match b.reaches(blob) {
                    Ok(()) => return Ok((i, why.join("; "))),
                    Err(e) => why.push(format!("{}: {e}", b.name())),
                },
            }
        }
        Err(why.join("; "))
    }

    /// What every backend's post path did, summed.
    pub fn counters(&self) -> super::WireCounters {
        let mut c = super::WireCounters::default();
        for b in &self.backends {
            c += b.counters();
        }
        c.preempted_spins = self.contention.preempted;
        c
    }

    /// What the machine took from this mux's spinning waits: measured
    /// only in spins that never yield (a pinned rank, `AFMESH_POLL=spin`)
    /// over backends whose empty polls cost the same each time
    /// ([`Transport::flat_polls`]).
    pub fn spin_gaps(&self) -> Gaps {
        self.gaps
    }

    /// Whether every backend with links polls at a flat cost.
    fn flat_polls(&self) -> bool {
        self.backends
            .iter()
            .zip(&self.back)
            .all(|(b, links)| links.is_empty() || b.flat_polls())
    }

    /// Brings up the links of backend `backend` to `peers`; returns the mux
    /// link ids and each peer's region keys, in `peers` order.
    pub fn connect(
        &mut self,
        backend: usize,
        peers: &[PeerSpec],
        timeout: Duration,
    ) -> Result<Vec<Connected>> {
        let b = self
            .backends
            .get_mut(backend)
            .ok_or_else(|| Error::InvalidArgument(format!("no backend {backend}")))?;
        let up = b.connect(peers, timeout)?;
        let mut out = Vec::with_capacity(up.len());
        for c in up {
            let id = self.routes.len();
            self.routes.push(Route {
                backend,
                link: c.link,
            });
            let map = &mut self.back[backend];
            if map.len() <= c.link {
                map.resize(c.link + 1, usize::MAX);
            }
            map[c.link] = id;
            out.push(Connected {
                link: id,
                remote: c.remote,
            });
        }
        let one = self.routes.iter().all(|r| r.backend == backend);
        let same_ids = self.back[backend].iter().enumerate().all(|(i, &m)| i == m);
        self.direct =
            (one && same_ids && self.back[backend].len() == self.routes.len()).then_some(backend);
        Ok(out)
    }

    /// The backend a link runs on.
    pub fn backend_of(&self, link: LinkId) -> Option<&Backend> {
        self.routes.get(link).map(|r| &self.backends[r.backend])
    }

    /// Capabilities of the backend a link runs on.
    pub fn caps_of(&self, link: LinkId) -> Option<Caps> {
        self.backend_of(link).map(Transport::caps)
    }

    /// Names of the backends that carry at least one link (`"shm+tcp"`).
    pub fn name(&self) -> String {
        let mut used: Vec<&str> = Vec::new();
        for r in &self.routes {
            let n = self.backends[r.backend].name();
            if !used.contains(&n) {
                used.push(n);
            }
        }
        if used.is_empty() {
            "none".into()
        } else {
            used.join("+")
        }
    }

    /// Posts a write on `link` (see [`Transport::post_write`]).
    #[inline]
    pub fn post_write(
        &mut self,
        link: LinkId,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()> {
        // One slice (every message the engine posts whole): no list built.
        if let [s] = src {
            let r = self.route(link)?;
            let one = [LocalSlice {
                key: self.local_key(s.key, r.backend)?,
                ..*s
            }];
            return self.backends[r.backend].post_write(r.link, &one, remote, offset, imm, token);
        }
        let r = self.route_slices(link, src)?;
        self.backends[r.backend].post_write(r.link, &self.slices, remote, offset, imm, token)
    }

    /// Passes [`Transport::prepare_write`] to `link`'s backend.
    #[inline]
    pub fn prepare_write(&mut self, link: LinkId, remote: &RegionKey, offset: u64, len: u64) {
        if let Some(r) = self.routes.get(link).copied() {
            self.backends[r.backend].prepare_write(r.link, remote, offset, len);
        }
    }

    /// Posts a write on `link` whose first `head` bytes land in the
    /// target's host mirror only (see [`Transport::post_write_mirrored`]).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn post_write_mirrored(
        &mut self,
        link: LinkId,
        head: u64,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()> {
        let r = self.route_slices(link, src)?;
        self.backends[r.backend].post_write_mirrored(
            r.link,
            head,
            &self.slices,
            remote,
            offset,
            imm,
            token,
        )
    }

    /// The route of `link`, with `src` in its backend's local keys in
    /// `self.slices`.
    #[inline]
    fn route_slices(&mut self, link: LinkId, src: &[LocalSlice]) -> Result<Route> {
        let r = self.route(link)?;
        self.slices.clear();
        for s in src {
            let key = self.local_key(s.key, r.backend)?;
            self.slices.push(LocalSlice { key, ..*s });
        }
        Ok(r)
    }

    /// The route of `link`.
    #[inline]
    fn route(&self, link: LinkId) -> Result<Route> {
        self.routes
            .get(link)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("no link {link}")))
    }

    /// Local region `key` in backend `backend`'s keys.
    #[inline]
    fn local_key(&self, key: LocalKey, backend: usize) -> Result<LocalKey> {
        self.locals
            .get(key.0 as usize)
            .and_then(|k| k[backend])
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "local region {} is not registered with {}",
                    key.0,
                    self.backends[backend].name()
                ))
            })
    }

    /// Progress on every backend, without waiting.
    pub fn progress(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        if let Some(i) = self.direct {
            return self.backends[i].progress(out);
        }
        for (i, b) in self.backends.iter_mut().enumerate() {
            if self.back[i].is_empty() {
                continue;
            }
            self.tmp.clear();
            let r = b.progress(&mut self.tmp);
            let map = &self.back[i];
            // What was reported before an error still counts.
            out.extend(self.tmp.drain(..).map(|c| remap(map, c)));
            r?;
        }
        Ok(())
    }

    /// Appends what has happened to `out`, waiting up to `timeout` for the
    /// first event (zero: do not wait) under the poll policy.
    pub fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()> {
        let start = out.len();
        self.progress(out)?;
        if out.len() > start || timeout.is_zero() {
            return Ok(());
        }
        let begin = Instant::now();
        // Ranks pinned to their own core (no yielding) keep spinning: the
        // core is theirs, and a one-off preemption there (a kernel thread)
        // is no reason to park.
        let adaptive = matches!(
            self.policy,
            PollPolicy::SpinThenPark {
                yield_cpu: true,
                ..
            }
        );
        let spin = if adaptive && !self.contention.may_spin(begin) {
            Duration::ZERO
        } else {
            self.policy.spin_for(timeout)
        };
        let mut spins = 0u32;
        let mut looked = begin;
        let mut flat = None;
        // The clock is read once per 32 polls: a read costs about as much
        // as a poll that finds nothing, and the spin bound is coarse.
        while !spin.is_zero() {
            self.policy.relax(spins, Duration::ZERO);
            spins = spins.wrapping_add(1);
            self.progress(out)?;
            if out.len() > start {
                return Ok(());
            }
            if spins.is_multiple_of(32) {
                let now = Instant::now();
                let step = now.saturating_duration_since(looked);
                if adaptive && spins == 32 {
                    self.contention.baseline();
                } else if adaptive && step >= PREEMPTED_GAP && self.contention.preempted(now) {
                    break;
                } else if !adaptive && *flat.get_or_insert_with(|| self.flat_polls()) {
                    // A spin that never yields and polls at a flat cost:
                    // a slow stretch is time the machine took.
                    self.gaps.stretch(step);
                }
                looked = now;
                if now.saturating_duration_since(begin) >= spin {
                    break;
                }
            }
        }
        let deadline = begin + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.park(out, left.min(MAX_PARK))?;
            if out.len() > start {
                return Ok(());
            }
        }
    }

    /// One park of at most `t`, ending with a progress pass.
    fn park(&mut self, out: &mut Vec<Completion>, t: Duration) -> Result<()> {
        // Wake sources that need arming are armed now; what came since the
        // last progress ends the park before it starts.
        let start = out.len();
        for (i, b) in self.backends.iter_mut().enumerate() {
            if self.back[i].is_empty() {
                continue;
            }
            self.tmp.clear();
            let r = b.arm(&mut self.tmp);
            let map = &self.back[i];
            match self.direct {
                Some(_) => out.append(&mut self.tmp),
                None => out.extend(self.tmp.drain(..).map(|c| remap(map, c))),
            }
            r?;
        }
        if out.len() > start {
            return Ok(());
        }
        let mut bell = None;
        let mut fds = Vec::new();
        let mut wfds = Vec::new();
        let mut own = None;
        for (i, b) in self.backends.iter().enumerate() {
            if self.back[i].is_empty() {
                continue;
            }
            match b.wake() {
                Wake::Nothing => {}
                Wake::Doorbell(d) => bell = Some(d),
                Wake::Fds { read, write } => {
                    fds.extend(read);
                    wfds.extend(write);
                }
                Wake::Own => own = Some(i),
            }
        }
        match (bell, fds.is_empty(), own) {
            (_, _, Some(i)) => self.backends[i].park(t),
            (Some(bell), fds_empty, None) => {
                if !fds_empty && (self.watcher.is_none() || self.watched != fds.len()) {
                    self.watcher = None;
                    let ring = bell.clone();
                    self.watcher = Some(
                        FdWatcher::start(&fds, move || ring.ring())
                            .map_err(|e| Error::io("start the socket watcher", e))?,
                    );
                    self.watched = fds.len();
                }
                let mut r = Ok(());
                bell.park(
                    || {
                        r = self.progress(out);
                        r.is_err() || out.len() > start
                    },
                    t,
                );
                r?;
                if out.len() > start {
                    return Ok(());
                }
            }
            (None, false, None) => {
                poll_ready(&fds, &wfds, t).map_err(|e| Error::io("poll sockets", e))?;
            }
            (None, true, None) => std::thread::sleep(t.min(Duration::from_millis(1))),
        }
        self.progress(out)
    }

    /// Gives one link up (see [`Transport::abort`]).
    pub fn abort(&mut self, link: LinkId) {
        if let Some(r) = self.routes.get(link).copied() {
            self.backends[r.backend].abort(r.link);
        }
    }

    /// Tells every peer this rank leaves in order.
    pub fn close(&mut self) {
        for b in &mut self.backends {
            b.close();
        }
    }

    /// Number of links.
    pub fn links(&self) -> usize {
        self.routes.len()
    }
}

fn remap(map: &[LinkId], c: Completion) -> Completion {
    let m = |l: LinkId| map.get(l).copied().unwrap_or(usize::MAX);
    match c {
        Completion::Arrival { link, imm, len } => Completion::Arrival {
            link: m(link),
            imm,
            len,
        },
        Completion::Sent { token } => Completion::Sent { token },
        Completion::LinkDown { link, reason } => Completion::LinkDown {
            link: m(link),
            reason,
        },
        Completion::LinkClosed { link } => Completion::LinkClosed { link: m(link) },
        Completion::LinkError { link, reason } => Completion::LinkError {
            link: m(link),
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::transport::shm::sys::pin_to_cpu;

    /// The first CPU this thread may run on.
    fn an_allowed_cpu() -> usize {
        crate::transport::shm::sys::allowed_cpus().expect("the CPU mask")[0]
    }

    /// A yielding spin that shares its CPU with a busy thread hands it a
    /// time slice; the wait notices, and the next waits park at once. A
    /// pinned rank's spin and pure spinning never consult the count.
    #[test]
    fn a_spin_that_loses_its_core_makes_the_next_waits_park() {
        let cpu = an_allowed_cpu();
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to_cpu(cpu).expect("pin the busy thread");
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        pin_to_cpu(cpu).expect("pin the test thread");
        let spin = Duration::from_millis(200);
        let mut mux = Mux::new(
            Vec::new(),
            PollPolicy::SpinThenPark {
                spin,
                yield_cpu: true,
            },
        );
        let mut out = Vec::new();
        // Nothing arrives: the wait spins (sharing the CPU), then parks.
        let r = mux.poll(&mut out, Duration::from_millis(250));
        // The same contention for a pinned rank's spin and a pure spin.
        let mut pinned = Mux::new(
            Vec::new(),
            PollPolicy::SpinThenPark {
                spin,
                yield_cpu: false,
            },
        );
        let rp = pinned.poll(&mut out, Duration::from_millis(250));
        let mut pure = Mux::new(Vec::new(), PollPolicy::Spin);
        let rs = pure.poll(&mut out, Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        busy.join().expect("busy thread");
        r.expect("poll");
        rp.expect("pinned poll");
        rs.expect("pure spin poll");
        assert!(out.is_empty());
        assert_eq!(pinned.preempted_spins(), 0);
        assert_eq!(pure.preempted_spins(), 0);
        assert!(mux.preempted_spins() >= 1, "never saw the preemption");
        // The pinned and the pure spin kept spinning through the other
        // thread's time slices: each slice is a gap of milliseconds.
        for (name, m) in [("pinned", &pinned), ("pure", &pure)] {
            let g = m.spin_gaps();
            assert!(g.count >= 1, "{name}: no gap counted: {g:?}");
            assert!(g.lost_ns >= 10_000_000, "{name}: under 10 ms lost: {g:?}");
            assert!(g.lost_ns <= g.spun_ns, "{name}: {g:?}");
        }
        let until = mux.contention.quiet_until.expect("a quiet period");
        assert_eq!(mux.contention.quiet, crate::transport::poll::QUIET);
        assert!(!mux.contention.may_spin(until - Duration::from_millis(1)));
        assert!(mux.contention.may_spin(until));
    }
}
