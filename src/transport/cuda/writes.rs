//! Posted writes: a write's device copies on its link's stream (its header
//! also sent to the peer's host mirror, or only there for a mirrored
//! prefix), and its completion: announced on the peer's notice ring by the
//! host once the copy's event has completed, or by the link stream itself
//! (the notice's sequence word, stored behind the copy, which is also how
//! the sender sees the write complete); and whether the link streams
//! publish those notices themselves.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

impl CudaTransport {
    fn event(&mut self, device: &Device) -> Result<Event> {
        match self.free_events.pop() {
            Some(e) => Ok(e),
            None => Event::new(device, false),
        }
    }

    /// Announces completed copies, oldest first per link.
    pub(super) fn complete(&mut self, out: &mut Vec<Completion>) {
        let Some(notices) = self.notices.as_mut() else {
            return;
        };
        for (i, l) in self.links.iter_mut().enumerate() {
            while let Some(p) = l.queue.front() {
                let done = match &p.done {
                    Done::Event(e) => e.done(),
                    &Done::Word { at, value } => {
                        word_done(&l.stream, &mut l.unseen, &mut l.idle_unseen, at, value)
                    }
                };
                match done {
                    Ok(false) => break,
                    Ok(true) if p.announced => {
                        // The GPU published the notice behind the copy; a
                        // parked peer still needs its doorbell.
                        notices.ring_peer(i);
                        if let Some(p) = l.queue.pop_front() {
                            self.in_flight -= 1;
                            out.push(Completion::Sent { token: p.token });
                            if let Done::Event(e) = p.done {
                                self.free_events.push(e);
                            }
                        }
                    }
                    Ok(true) => {
                        if !l.down && p.head_len > 0 {
                            // The header into the peer's host mirror, then
                            // the notice: the ring's release publishes both.
                            let n = &p.notice;
                            match notices.write_target(i, n.region, n.offset, &p.head[..p.head_len])
                            {
                                Ok(true) => {}
                                Ok(false) | Err(_) => {
                                    l.down = true;
                                    out.push(Completion::LinkError {
                                        link: i,
                                        reason: format!(
                                            "{}: its region {} has no header mirror here",
                                            l.label, n.region
                                        ),
                                    });
                                }
                            }
                        }
                        if !l.down {
                            match notices.push_notice(i, &p.notice) {
                                Ok(true) => l.ring_full = false,
                                // The peer is far behind: announce later.
                                Ok(false) => {
                                    l.ring_full = true;
                                    break;
                                }
                                // It went down: its LinkDown comes from the
                                // notice backend's progress.
                                Err(_) => l.down = true,
                            }
                        }
                        if let Some(p) = l.queue.pop_front() {
                            self.in_flight -= 1;
                            l.host_pending -= 1;
                            out.push(Completion::Sent { token: p.token });
                            if let Done::Event(e) = p.done {
                                self.free_events.push(e);
                            }
                        }
                    }
                    Err(e) => {
                        l.down = true;
                        self.in_flight -= l.queue.len();
                        l.queue.clear();
                        l.host_pending = 0;
                        out.push(Completion::LinkError {
                            link: i,
                            reason: format!("{}: copy failed: {e}", l.label),
                        });
                        break;
                    }
                }
            }
        }
    }

    /// Whether a link's head copy completed and can be announced now (a
    /// link waiting on its peer's full ring cannot: parking on it would
    /// spin).
    pub(super) fn any_done(&self) -> bool {
        self.links.iter().any(|l| {
            !l.ring_full
                && l.queue.front().is_some_and(|p| match &p.done {
                    Done::Event(e) => e.done().unwrap_or(true),
                    // A stall check that is due ends a park too.
                    Done::Word { at, value } => {
                        published(*at, *value)
                            || l.unseen.is_some_and(|t| t.elapsed() >= STALL_CHECK)
                    }
                })
        })
    }
}

/// How long a link's oldest notice word may stay unstored before the
/// link's stream is asked whether its work failed (a failed copy never
/// stores the word) or is all done; then again as long after each check.
const STALL_CHECK: Duration = Duration::from_millis(1);

/// Whether the notice word at `at` holds `value` or a later lap's (the
/// entry was published; the slot is only reused once the peer has taken
/// it): before publication it holds the previous lap's value, `value -
/// capacity`, or 0.
pub(super) fn published(at: usize, value: u32) -> bool {
    // SAFETY: `at` is the 4-byte aligned sequence word of an entry of our
    // outgoing ring, in our mapping of the peer's segment, which the
    // notice backend keeps mapped while this transport lives; the word is
    // only ever accessed atomically (the GPU's store, the peer's load).
    let word = unsafe { &*(at as *const AtomicU32) }.load(Ordering::Acquire);
    word.wrapping_sub(value) as i32 >= 0
}

/// Whether a link's oldest write, announced by the GPU, has completed:
/// its notice word is stored. A copy that failed never stores it, so once
/// it has been unstored for [`STALL_CHECK`] (and as long after each check)
/// the stream is asked: its error is the write's; a stream found idle
/// twice with the word still unseen is an error too (the store did not
/// reach host memory).
fn word_done(
    stream: &Stream,
    unseen: &mut Option<Instant>,
    idle_unseen: &mut bool,
    at: usize,
    value: u32,
) -> Result<bool> {
    if published(at, value) {
        *unseen = None;
        *idle_unseen = false;
        return Ok(true);
    }
    let now = Instant::now();
    let since = *unseen.get_or_insert(now);
    if now.saturating_duration_since(since) < STALL_CHECK {
        return Ok(false);
    }
    *unseen = Some(now);
    if stream.idle()? {
        if published(at, value) {
            *unseen = None;
            *idle_unseen = false;
            return Ok(true);
        }
        if *idle_unseen {
            return Err(Error::config(
                "the link stream finished but its notice store is not in host memory",
            ));
        }
        *idle_unseen = true;
    }
    Ok(false)
}

impl CudaTransport {
    /// One posted write; with `mirrored`, its first that many bytes go to
    /// the peer's host mirror only (from the source's pinned shadow, now),
    /// and the copy carries the rest.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn post(
        &mut self,
        link: LinkId,
        mirrored: Option<u64>,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()> {
        let state = self.links.get(link).map(|l| (l.label.as_str(), l.down));
        let len = check_post(state, link, src, remote, offset, u64::from(u32::MAX))?;
        let device = self.device()?;
        if self.links[link].queue.len() >= WINDOW {
            return Err(Error::Backpressure {
                peer: self.links[link].label.clone(),
                window: WINDOW,
            });
        }
        let target = self.links[link]
            .targets
            .get(remote.id as usize)
            .copied()
            .flatten()
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} has no region {}",
                    self.links[link].label, remote.id
                ))
            })?;
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > target.len)
        {
            return Err(Error::BufferSize {
                what: format!(
                    "{} region {} at offset {offset}",
                    self.links[link].label, remote.id
                ),
                need: offset.saturating_add(u64::from(len)) as usize,
                got: target.len as usize,
            });
        }
        // The header, for the peer's mirror: from the source's pinned
        // shadow (send slots keep one), else read from the device.
        let mut head = [0u8; HEAD];
        let mut head_len = 0;
        let skip = match mirrored {
            Some(n) => {
                self.mirror_prefix(link, n, src, remote, offset, u64::from(len))?;
                n
            }
            None => 0,
        };
        if let (None, Some(s0)) = (mirrored, src.iter().find(|s| s.len > 0)) {
            let (r, from, n) = self.local.resolve(s0)?;
            head_len = n.min(HEAD);
            match r.shadow() {
                Some(sh) => sh.read(from, &mut head[..head_len])?,
                None => r
                    .copy_out(from, &mut head[..head_len])
                    .map_err(Error::invalid)?,
            }
        }
        device.bind()?;
        // The posted copy waits for the fills of its source (send slots
        // fill on a stream of their own): an event there, waited on here.
        let fill = src
            .iter()
            .find(|s| s.len > 0)
            .and_then(|s| self.local.get(s.key.0))
            .map_or(std::ptr::null_mut(), |r| r.fill_stream());
        if !fill.is_null() {
            if self.fill_event.is_none() {
                self.fill_event = Some(Event::new(&device, false)?);
            }
            if let Some(e) = &self.fill_event {
                // SAFETY: the region's own live stream, of this device.
                unsafe { e.record_raw(fill) }?;
                self.links[link].stream.wait(e)?;
            }
        }
        // Writes the GPU announces complete when their notice word is
        // stored; the others when an event behind the copy has.
        let gpu_notice =
            self.links[link].gpu_notice.is_some() && self.links[link].host_pending == 0;
        let mut event = if gpu_notice {
            None
        } else {
            Some(self.event(&device)?)
        };
        let notice = Notice {
            region: remote.id,
            offset,
            len,
            imm,
            close: false,
        };
        let l = &mut self.links[link];
        // The GPU is to announce the arrival: the header goes to the peer's
        // mirror now (the slot is ours until the notice is published).
        if gpu_notice {
            if let Some(notices) = self.notices.as_mut() {
                if !notices.write_target(link, remote.id, offset, &head[..head_len])? {
                    return Err(Error::InvalidArgument(format!(
                        "{}: its region {} has no header mirror here",
                        l.label, remote.id
                    )));
                }
            }
        }
        // From the first copy on, a failure leaves work enqueued that may
        // still read the slot: the link goes down with it (later posts
        // fail, `abort` synchronises its stream), never a silent retry.
        macro_rules! or_down {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => {
                        self.links[link].down = true;
                        return Err(e);
                    }
                }
            };
        }
        let mut at = target.addr + offset + skip;
        let mut skip = skip as usize;
        for s in src {
            let (r, from, n) = or_down!(self.local.resolve(s));
            let l = &mut self.links[link];
            // The mirrored prefix is not copied to the device.
            let past = skip.min(n);
            skip -= past;
            let (from, n) = (from + past, n - past);
            if n == 0 {
                continue;
            }
            // SAFETY: the source range lies in a registered region (checked
            // by `resolve`), which the engine does not refill before `Sent`;
            // the target range lies in the peer's mapped region (checked
            // above), which stays mapped while the link lives (`abort` and
            // drop synchronise the stream first).
            or_down!(unsafe { l.stream.copy_async(at, r.addr() + from as u64, n) });
            at += n as u64;
        }
        let l = &mut self.links[link];
        // The notice into the peer's ring now (the entry is ours until
        // published), and the link stream publishes it right behind the
        // copy.
        let mut word = None;
        if let (true, Some(reg), Some(notices)) = (gpu_notice, &l.gpu_notice, self.notices.as_mut())
        {
            let reserved = match notices.reserve_notice(link, &notice) {
                Ok(r) => r,
                Err(e) => {
                    l.down = true;
                    return Err(e);
                }
            };
            if let Some((seq, value)) = reserved {
                let Some(dev) = reg.device_addr(seq) else {
                    // The entry stays reserved and unpublished.
                    l.down = true;
                    return Err(Error::config(format!(
                        "{}: notice ring outside its registration",
                        l.label
                    )));
                };
                // SAFETY: the registration covers the ring and lives as
                // long as the link (dropped after its streams are
                // synchronised); the entry's sequence word is the producer's
                // to publish (reserved above).
                if let Err(e) = unsafe { l.stream.write_value32(dev, value) } {
                    // The entry stays reserved and unpublished: nothing
                    // more can follow it on this link.
                    l.down = true;
                    return Err(e);
                }
                word = Some(Done::Word { at: seq, value });
            }
        }
        let announced = word.is_some();
        // The ring was full at post time: the host announces this one.
        if !announced && event.is_none() {
            event = Some(or_down!(self.event(&device)));
        }
        let l = &mut self.links[link];
        let done = match (event, word) {
            (Some(e), _) => {
                if let Err(err) = e.record(&l.stream) {
                    l.down = true;
                    self.free_events.push(e);
                    return Err(err);
                }
                Done::Event(e)
            }
            (None, Some(w)) => w,
            (None, None) => {
                l.down = true;
                return Err(Error::config(
                    "cuda: a write with no way to see it complete",
                ));
            }
        };
        if !announced {
            l.host_pending += 1;
        }
        let l = &mut self.links[link];
        l.queue.push_back(Pending {
            done,
            notice,
            token,
            head,
            head_len,
            announced,
        });
        self.in_flight += 1;
        Ok(())
    }

    /// Writes the first `head` bytes of `src` (which must lie in its first
    /// slice, a region with a pinned host shadow) into the peer's host
    /// mirror at `offset`, now: the target slot is the writer's until the
    /// notice is published (the peer answered or took its previous
    /// message before this one could be posted).
    fn mirror_prefix(
        &mut self,
        link: LinkId,
        head: u64,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if head == 0 {
            return Ok(());
        }
        let label = &self.links[link].label;
        let first = src.first().filter(|s| s.len >= head && len >= head);
        let Some(s0) = first else {
            return Err(Error::invalid(format!(
                "{label}: a mirrored prefix of {head} bytes must lie in the write's first slice"
            )));
        };
        let (r, from, _) = self.local.resolve(s0)?;
        let Some(shadow) = r.shadow() else {
            return Err(Error::invalid(format!(
                "{label}: a mirrored prefix needs a source with a pinned host shadow (a send slot)"
            )));
        };
        let n = head as usize;
        if self.scratch.len() < n {
            self.scratch.resize(n, 0);
        }
        shadow.read(from, &mut self.scratch[..n])?;
        let Some(notices) = self.notices.as_mut() else {
            return Err(Error::config("cuda: no notice segment"));
        };
        if notices.write_target(link, remote.id, offset, &self.scratch[..n])? {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{label}: its region {} has no header mirror here",
                remote.id
            )))
        }
    }
}

/// Whether the link streams publish notices themselves: not turned off
/// (`AFMESH_CUDA_NOTICE=host`; the default is `gpu`: measured on 2 × H200
/// with rows written in place, it keeps the reference stage's p99 within
/// 1.5× its p50 where the host-announced path does not, see
/// ARCHITECTURE.md), the driver has stream memory operations and host
/// registration, and a store enqueued on a stream reaches mapped host
/// memory.
pub(super) fn probe_gpu_notices(device: &Device) -> bool {
    match std::env::var("AFMESH_CUDA_NOTICE") {
        Ok(v) if v == "host" => return false,
        Ok(v) if !v.is_empty() && v != "gpu" => {
            tracing::warn!("AFMESH_CUDA_NOTICE={v:?}: expected gpu or host; the GPU announces");
        }
        _ => {}
    }
    let probe = || -> Result<bool> {
        let flag = HostFlag::new(device)?;
        let s = Stream::new(device)?;
        // SAFETY: the flag outlives the store: the stream is synchronised
        // before it is dropped.
        unsafe { s.write_value32(flag.device_addr(), 0x5afe_c0de) }?;
        s.synchronize()?;
        Ok(flag.get() == 0x5afe_c0de)
    };
    match probe() {
        Ok(true) => {
            tracing::info!(
                "cuda: the link streams announce arrivals (AFMESH_CUDA_NOTICE=host turns it off)"
            );
            true
        }
        Ok(false) => {
            tracing::warn!(
                "cuda: a stream's store did not reach host memory: the host announces arrivals"
            );
            false
        }
        Err(e) => {
            tracing::warn!("cuda: no stream memory operations ({e}): the host announces arrivals");
            false
        }
    }
}
