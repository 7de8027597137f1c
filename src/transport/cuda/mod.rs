//! CUDA: ranks whose stage memory is on GPUs of one host write into each
//! other's device memory with the copy engines.
//!
//! Each registered receive region is exported as a CUDA IPC handle of the
//! allocation that holds it (found with `cuMemGetAddressRange`, so caller
//! tensors inside a caching allocator's block work) and published in the
//! endpoint blob with the region's offset in that allocation. A peer maps
//! it once, at connect (`cuIpcOpenMemHandle`, peer access enabled lazily).
//!
//! A posted write is one `cuMemcpyAsync` per source slice, device to
//! device, on a stream the library owns per link (no kernel: no SM runs
//! communication), followed by an event. Progress queries each link's
//! oldest event; once it has completed, every byte is in the target's
//! memory, and only then is the notice (region, offset, length, imm)
//! pushed on the target's host ring and the write reported `Sent`. So a
//! receiver never sees an arrival before its bytes. Just before the notice
//! the message's header (taken at post time from the send slot's pinned
//! shadow) is copied into the target's host *mirror* of its receive region
//! (the notice segment's region), so the receiving engine reads headers
//! from host memory ([`Region::copy_header`]) instead of the device.
//! A write posted with [`Transport::post_write_mirrored`] sends its prefix
//! (header and side block) to that mirror only, from the pinned shadow at
//! post time, and copies just the rest (the rows) to the device.
//!
//! That is the host-announced path. By default the GPU announces instead:
//! the notice is written into the peer's ring at post time, unpublished,
//! and the link stream stores its sequence word right behind the copy
//! (`cuStreamWriteValue32`). Such a write records no event: it is `Sent`
//! once that word is seen in our mapping of the peer's ring (a load from
//! host memory per poll, not a `cuEventQuery`); once it has stayed
//! unstored for a millisecond, and every millisecond after, the stream is
//! asked (`cuStreamQuery`) for a failed copy — a park ends for that check.
//!
//! Notices, doorbells, header mirrors and peer death go through an inner
//! [`ShmTransport`] (rings, and the mirror as its segment's region): the same lock-free rings, futex doorbell and
//! liveness watch (pidfd, or the lock on the peer's segment) that shm
//! ranks use; a peer that dies is `LinkDown` within about a millisecond.
//!
//! Reachability: same boot (the kernel's boot id), the peer's segment opens
//! here (so one `/dev/shm`), its GPU is visible here by UUID, and this GPU
//! can access it (NVLink or PCIe peer-to-peer) or it is the same GPU.
//!
//! Waiting: while copies are in flight the backend parks on its own
//! ([`Wake::Own`]: yield, then sleep in short steps, until an event
//! completes); with none in flight it parks on the doorbell.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::notice::Notice;
use super::shm::ShmTransport;
use super::{
    blob, check_post, Access, Caps, Completion, Connected, LinkId, LocalRegions, LocalSlice,
    MemoryKind, PeerSpec, Region, RegionKey, Registration, Transport, Wake,
};
use crate::cuda::{
    self, CuIpcMemHandle, Device, Event, HostFlag, HostRegistration, IpcMapping, Stream,
};
use crate::error::{Error, Result};

mod writes;
use writes::probe_gpu_notices;

const MAGIC: &str = "afmesh-cuda-2";
/// Writes in flight per link (below the ring's capacity, so every
/// completed write's notice fits).
const WINDOW: usize = 128;

/// A region this rank publishes: its allocation's IPC handle and where
/// the region sits in that allocation.
#[derive(Debug, Clone, Copy)]
struct Export {
    id: u32,
    handle: CuIpcMemHandle,
    offset: u64,
    len: u64,
}

struct PeerEndpoint {
    boot: String,
    uuid: [u8; 16],
    shm: Vec<u8>,
    exports: Vec<Export>,
}

fn decode(b: &[u8]) -> std::result::Result<PeerEndpoint, String> {
    let mut r = blob::reader(b, MAGIC).map_err(|e| e.0)?;
    let e = |x: crate::proto::DecodeError| x.0;
    let boot = r.str("boot id").map_err(e)?;
    let uuid = r.array::<16>("gpu uuid").map_err(e)?;
    let shm = r.bytes("notice endpoint").map_err(e)?;
    let n = r.count("exports").map_err(e)?;
    let mut exports = Vec::with_capacity(n);
    for _ in 0..n {
        exports.push(Export {
            id: r.u32("export.id").map_err(e)?,
            offset: r.u64("export.offset").map_err(e)?,
            len: r.u64("export.len").map_err(e)?,
            handle: CuIpcMemHandle {
                reserved: r.array::<64>("export.handle").map_err(e)?,
            },
        });
    }
    Ok(PeerEndpoint {
        boot,
        uuid,
        shm,
        exports,
    })
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A peer region as mapped here.
#[derive(Debug, Clone, Copy)]
struct Target {
    addr: u64,
    len: u64,
}

/// Bytes of a message header (what goes to the peer's host mirror).
const HEAD: usize = crate::proto::HEADER_LEN;

/// How a posted write's completion is seen.
#[derive(Debug)]
enum Done {
    /// An event recorded behind the copy (the host announces the write).
    Event(Event),
    /// The notice's sequence word, which the link stream stores right
    /// behind the copy (the GPU announces the write): its address in our
    /// mapping of the peer's ring and the value that publishes the entry.
    /// Seeing it is a load from host memory, not a driver call.
    Word { at: usize, value: u32 },
}

#[derive(Debug)]
struct Pending {
    done: Done,
    notice: Notice,
    token: u64,
    /// The message's first bytes (its header), for the peer's mirror.
    head: [u8; HEAD],
    head_len: usize,
    /// The GPU publishes the notice itself (its header went to the
    /// peer's mirror at post time): at completion only `Sent` and the
    /// peer's doorbell remain.
    announced: bool,
}

#[derive(Debug)]
struct CudaLink {
    label: String,
    stream: Stream,
    targets: Vec<Option<Target>>,
    queue: VecDeque<Pending>,
    down: bool,
    /// The peer's notice ring was full when the head copy completed: its
    /// announcement waits for the peer to drain (not for the GPU).
    ring_full: bool,
    /// Our outgoing notice ring (in our mapping of the peer's segment),
    /// registered with the driver so the link stream can publish notices
    /// (`None`: the host publishes them, after the copy's event).
    gpu_notice: Option<HostRegistration>,
    /// Pending writes the host announces: while any is queued, later ones
    /// are announced by the host too (the ring's order is the link's).
    host_pending: usize,
    /// Since when (or the last stream check) the oldest write's notice
    /// word has been found not yet stored; after `STALL_CHECK` the stream
    /// is asked whether it failed.
    unseen: Option<Instant>,
    /// The stream was found idle with the oldest write's word unseen.
    idle_unseen: bool,
    /// Kept mapped while the link lives.
    _mappings: Vec<IpcMapping>,
}

/// The CUDA backend.
#[derive(Debug)]
pub struct CudaTransport {
    /// Rings, doorbell, liveness, and the host mirror of the receive
    /// region; made at the first registration (it sizes the mirror).
    notices: Option<Box<ShmTransport>>,
    job: String,
    host_id: String,
    peers: u32,
    /// Whether the receive region (there is one) has its mirror.
    mirrored: bool,
    device: Option<Device>,
    local: LocalRegions,
    exports: Vec<Export>,
    links: Vec<CudaLink>,
    free_events: Vec<Event>,
    /// Recorded on a source's fill stream before each post.
    fill_event: Option<Event>,
    in_flight: usize,
    boot: String,
    /// Whether this driver's stream memory operations reach host memory:
    /// probed once, at the first connect (`None`: not yet).
    gpu_notices: Option<bool>,
    /// A mirrored prefix on its way from a pinned shadow to a mirror.
    scratch: Vec<u8>,
}

impl CudaTransport {
    /// A backend for a rank with `peers` peers of the other role, in job
    /// `job`. [`Error::Unsupported`] where CUDA is not usable here.
    pub fn create(job: &str, host_id: &str, peers: u32) -> Result<CudaTransport> {
        cuda::driver()?;
        Ok(CudaTransport {
            notices: None,
            job: job.to_string(),
            host_id: host_id.to_string(),
            peers,
            mirrored: false,
            device: None,
            local: LocalRegions::default(),
            exports: Vec::new(),
            links: Vec::new(),
            free_events: Vec::new(),
            fill_event: None,
            in_flight: 0,
            boot: boot_id(),
            gpu_notices: None,
            scratch: Vec::new(),
        })
    }

    fn device(&self) -> Result<Device> {
        self.device
            .ok_or_else(|| Error::config("cuda: no device memory registered on this rank"))
    }

    /// Removes the notice segment's name (once every peer has mapped it).
    pub fn unlink(&self) {
        if let Some(n) = &self.notices {
            n.unlink();
        }
    }
}

impl super::Open for CudaTransport {
    fn open(s: &super::Setup<'_>) -> Result<CudaTransport> {
        CudaTransport::create(s.job, s.host_id, s.peers)
    }
}

impl Transport for CudaTransport {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn flat_polls(&self) -> bool {
        // GPU-announced notices are read from host memory; the host-
        // announced path queries the links' events on every pass.
        self.gpu_notices == Some(true)
    }

    fn caps(&self) -> Caps {
        Caps {
            host: false,
            cuda: true,
            ordered: true,
            max_message: u64::from(u32::MAX),
            window: WINDOW,
            copies: false,
            header_mirror: true,
        }
    }

    fn register(&mut self, region: &Arc<Region>, access: Access) -> Result<Registration> {
        let MemoryKind::Cuda { device } = region.kind() else {
            return Err(Error::Unsupported(format!(
                "cuda: cannot register {}",
                region.kind()
            )));
        };
        match self.device {
            Some(d) if d.ordinal() != device => {
                return Err(Error::Unsupported(format!(
                    "cuda: a rank's memory is on one GPU (device {}), not also on device {device}",
                    d.ordinal()
                )))
            }
            Some(_) => {}
            None => self.device = Some(Device::get(device)?),
        }
        if region.is_empty() {
            return Err(Error::invalid("cuda: an empty region cannot be registered"));
        }
        if access == Access::RemoteWrite && self.mirrored {
            return Err(Error::Unsupported(
                "cuda: one receive region per rank (its header mirror is the notice segment's)"
                    .into(),
            ));
        }
        if self.notices.is_none() {
            let mirror = if access == Access::RemoteWrite {
                region.len()
            } else {
                0
            };
            self.notices = Some(Box::new(ShmTransport::create(
                &self.job,
                &self.host_id,
                self.peers,
                mirror,
            )?));
        }
        let Some(notices) = self.notices.as_mut() else {
            return Err(Error::config("cuda: no notice segment"));
        };
        // The notice backend holds a region under every id we hand out: the
        // host mirror for the receive region (it checks notices against
        // it, and peers write headers there), the region itself otherwise.
        let mirror = match access {
            Access::RemoteWrite => Some(notices.region().map_err(|_| {
                Error::Unsupported(
                    "cuda: the receive region must be the first one registered".into(),
                )
            })?),
            Access::Local => None,
        };
        match &mirror {
            Some(m) => {
                if !region.set_mirror(m.clone()) {
                    return Err(Error::config(
                        "cuda: the receive region has a mirror already",
                    ));
                }
                notices.register(m, Access::RemoteWrite)?;
                self.mirrored = true;
            }
            None => {
                notices.register(region, Access::Local)?;
            }
        }
        let reg = self.local.register(region, access);
        if access == Access::RemoteWrite {
            let info = cuda::pointer_info(region.addr(), region.len())?;
            let handle = cuda::ipc_handle(device, info.base)?;
            self.exports.push(Export {
                id: reg.remote.id,
                handle,
                offset: region.addr() - info.base,
                len: region.len() as u64,
            });
        }
        Ok(reg)
    }

    fn endpoint(&self) -> Vec<u8> {
        let mut w = blob::writer(MAGIC);
        w.str(&self.boot);
        let uuid = self.device.and_then(|d| d.uuid().ok()).unwrap_or([0; 16]);
        w.array(&uuid);
        w.bytes(
            &self
                .notices
                .as_deref()
                .map(Transport::endpoint)
                .unwrap_or_default(),
        );
        w.u32(self.exports.len() as u32);
        for x in &self.exports {
            w.u32(x.id);
            w.u64(x.offset);
            w.u64(x.len);
            w.array(&x.handle.reserved);
        }
        w.finish()
    }

    fn reaches(&self, b: &[u8]) -> std::result::Result<(), String> {
        let p = decode(b)?;
        if p.boot != self.boot || self.boot.is_empty() {
            return Err("it runs under another kernel (boot id), so on another host".into());
        }
        let me = self.device.ok_or("this rank registered no device memory")?;
        self.notices
            .as_ref()
            .ok_or("this rank registered no device memory")?
            .reaches(&p.shm)
            .map_err(|e| format!("its notice rings: {e}"))?;
        let them = Device::by_uuid(&p.uuid)
            .map_err(|e| e.to_string())?
            .ok_or("its GPU is not visible to this process (CUDA_VISIBLE_DEVICES?)")?;
        match me.can_access(&them) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "GPU {} cannot access GPU {} directly (no NVLink or PCIe peer access)",
                me.ordinal(),
                them.ordinal()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    fn connect(&mut self, peers: &[PeerSpec], timeout: Duration) -> Result<Vec<Connected>> {
        let device = self.device()?;
        let mut decoded = Vec::with_capacity(peers.len());
        let mut inner = Vec::with_capacity(peers.len());
        for p in peers {
            let ep = decode(&p.blob).map_err(|e| Error::BadFrame {
                peer: p.label.clone(),
                reason: format!("cuda endpoint: {e}"),
            })?;
            self.reaches(&p.blob)
                .map_err(|e| Error::config(format!("cuda link to {}: {e}", p.label)))?;
            inner.push(PeerSpec {
                blob: ep.shm.clone(),
                ..p.clone()
            });
            decoded.push(ep);
        }
        if self.gpu_notices.is_none() {
            self.gpu_notices = Some(probe_gpu_notices(&device));
        }
        let notices = self
            .notices
            .as_mut()
            .ok_or_else(|| Error::config("cuda: no device memory registered"))?;
        let base = notices.links();
        let up = notices.connect(&inner, timeout)?;
        let mut out = Vec::with_capacity(up.len());
        for ((p, ep), c) in peers.iter().zip(decoded).zip(up) {
            if c.link != base + out.len() || c.link != self.links.len() {
                return Err(Error::config(format!(
                    "cuda link to {}: notice link {} out of step",
                    p.label, c.link
                )));
            }
            let mut mappings = Vec::new();
            let mut targets: Vec<Option<Target>> = Vec::new();
            let mut keys = Vec::new();
            for x in &ep.exports {
                let id = x.id as usize;
                if id >= crate::proto::codec::MAX_LIST {
                    return Err(Error::BadFrame {
                        peer: p.label.clone(),
                        reason: format!("cuda endpoint: region id {id}"),
                    });
                }
                let m = IpcMapping::open(&device, &x.handle).map_err(|e| {
                    Error::config(format!(
                        "cuda link to {}: map its region {id}: {e}",
                        p.label
                    ))
                })?;
                // The peer's offset and length are its word; the mapping's
                // size is the driver's. A region past the mapping would
                // have our copy engine write memory that is not the peer's.
                if x.offset.checked_add(x.len).is_none_or(|end| end > m.size()) {
                    return Err(Error::BadFrame {
                        peer: p.label.clone(),
                        reason: format!(
                            "cuda endpoint: region {id} at offset {} of {} bytes exceeds its allocation of {} bytes",
                            x.offset,
                            x.len,
                            m.size()
                        ),
                    });
                }
                if targets.len() <= id {
                    targets.resize(id + 1, None);
                }
                targets[id] = Some(Target {
                    addr: m.base() + x.offset,
                    len: x.len,
                });
                mappings.push(m);
                keys.push(RegionKey {
                    id: x.id,
                    rkey: 0,
                    addr: 0,
                    len: x.len,
                });
            }
            // Non-blocking: ordered after the slot's fills by an event
            // (`post_write`), not after everything on the default stream.
            let stream = Stream::new(&device)?;
            let gpu_notice = match self.gpu_notices {
                Some(false) => None,
                _ => {
                    let span = self.notices.as_ref().and_then(|n| n.out_ring_span(c.link));
                    match span {
                        // SAFETY: the ring lies in our mapping of the peer's
                        // segment, which the notice backend keeps until it
                        // is dropped; `Drop` drops the registrations first.
                        Some((at, len)) => match unsafe { HostRegistration::new(&device, at, len) }
                        {
                            Ok(r) => Some(r),
                            Err(e) => {
                                tracing::warn!(
                                    "cuda link to {}: the host announces arrivals: {e}",
                                    p.label
                                );
                                None
                            }
                        },
                        None => None,
                    }
                }
            };
            self.links.push(CudaLink {
                label: p.label.clone(),
                stream,
                targets,
                queue: VecDeque::new(),
                down: false,
                ring_full: false,
                gpu_notice,
                host_pending: 0,
                unseen: None,
                idle_unseen: false,
                _mappings: mappings,
            });
            out.push(Connected {
                link: c.link,
                remote: keys,
            });
        }
        Ok(out)
    }

    fn post_write(
        &mut self,
        link: LinkId,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()> {
        self.post(link, None, src, remote, offset, imm, token)
    }

    fn post_write_mirrored(
        &mut self,
        link: LinkId,
        head: u64,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()> {
        self.post(link, Some(head), src, remote, offset, imm, token)
    }

    fn progress(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        if self.in_flight > 0 {
            if let Some(d) = self.device {
                d.bind()?;
            }
            self.complete(out);
        }
        let start = out.len();
        if let Some(n) = self.notices.as_mut() {
            n.progress(out)?;
        }
        for c in &out[start..] {
            if let Completion::LinkDown { link, .. }
            | Completion::LinkClosed { link }
            | Completion::LinkError { link, .. } = c
            {
                if let Some(l) = self.links.get_mut(*link) {
                    l.down = true;
                }
            }
        }
        Ok(())
    }

    fn wake(&self) -> Wake {
        match &self.notices {
            _ if self.in_flight > 0 => Wake::Own,
            Some(n) => n.wake(),
            None => Wake::Nothing,
        }
    }

    fn park(&mut self, timeout: Duration) {
        // Copies in flight finish in microseconds: yield a little, then
        // sleep in short steps, until one completes.
        let start = Instant::now();
        let mut spins = 0u32;
        while self.in_flight > 0 && start.elapsed() < timeout {
            // A notice the GPU published needs no event of ours.
            if self.any_done() || self.notices.as_ref().is_some_and(|n| n.has_inbound()) {
                return;
            }
            if spins < 64 {
                std::thread::yield_now();
                spins += 1;
            } else {
                std::thread::sleep(Duration::from_micros(20).min(timeout));
            }
        }
    }

    fn close(&mut self) {
        let mut out = Vec::new();
        for l in &self.links {
            let _ = l.stream.synchronize();
        }
        self.complete(&mut out);
        if let Some(n) = self.notices.as_mut() {
            n.close();
        }
        for l in &mut self.links {
            l.down = true;
        }
    }

    fn abort(&mut self, link: LinkId) {
        if let Some(l) = self.links.get_mut(link) {
            // No source is read after this returns.
            let _ = l.stream.synchronize();
            self.in_flight -= l.queue.len();
            self.free_events
                .extend(l.queue.drain(..).filter_map(|p| match p.done {
                    Done::Event(e) => Some(e),
                    Done::Word { .. } => None,
                }));
            l.host_pending = 0;
            l.unseen = None;
            l.idle_unseen = false;
            l.down = true;
        }
        if let Some(n) = self.notices.as_mut() {
            n.abort(link);
        }
    }

    fn links(&self) -> usize {
        self.links.len()
    }
}

impl Drop for CudaTransport {
    fn drop(&mut self) {
        // Copies still in flight read our memory and write the peers':
        // let them finish before the regions and mappings go. The notice
        // rings' registrations go before the notice backend unmaps them.
        for l in &mut self.links {
            let _ = l.stream.synchronize();
            l.gpu_notice = None;
        }
    }
}

#[cfg(test)]
mod tests;
