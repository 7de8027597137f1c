//! `afmesh.Mesh`, `afmesh.StageSpec` and `afmesh.Scheduler`: joining a mesh
//! from arguments or the environment, and running a rendezvous server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use afmesh::bootstrap::{Scheduler as RustScheduler, SchedulerConfig, Token};
use afmesh::transport::{PollPolicy, Region};
use afmesh::{MeshConfig, Role, TransportKind};
use pyo3::prelude::*;

use crate::attention::AttentionRank;
use crate::buffer::{Held, Keep};
use crate::errors::{invalid, to_py};
use crate::ffn::FfnRank;
use crate::wait::{seconds, SLICE};

/// The stage geometry every rank of a mesh shares: stages, most tokens per
/// attention rank, bytes of a dispatched row, of a combined row, and of the
/// side block.
#[pyclass(frozen, get_all, eq, module = "afmesh._afmesh")]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StageSpec {
    /// Stages (micro-batches in flight), 1..=255.
    pub stages: u32,
    /// Most tokens (rows) one attention rank dispatches in one stage.
    pub max_tokens: u32,
    /// Bytes of one dispatched row.
    pub row_bytes: u32,
    /// Bytes of one combined (returned) row.
    pub out_row_bytes: u32,
    /// Most bytes of the side block sent with each dispatch.
    pub side_bytes: u32,
}

#[pymethods]
impl StageSpec {
    #[new]
    #[pyo3(signature = (stages, max_tokens, row_bytes, out_row_bytes, side_bytes = 0))]
    fn new(
        stages: u32,
        max_tokens: u32,
        row_bytes: u32,
        out_row_bytes: u32,
        side_bytes: u32,
    ) -> Self {
        StageSpec {
            stages,
            max_tokens,
            row_bytes,
            out_row_bytes,
            side_bytes,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "StageSpec(stages={}, max_tokens={}, row_bytes={}, out_row_bytes={}, side_bytes={})",
            self.stages, self.max_tokens, self.row_bytes, self.out_row_bytes, self.side_bytes
        )
    }
}

impl StageSpec {
    pub fn rust(&self) -> afmesh::StageSpec {
        afmesh::StageSpec {
            stages: self.stages,
            max_tokens: self.max_tokens,
            row_bytes: self.row_bytes,
            out_row_bytes: self.out_row_bytes,
            side_bytes: self.side_bytes,
        }
    }
    pub fn from_rust(s: afmesh::StageSpec) -> StageSpec {
        StageSpec {
            stages: s.stages,
            max_tokens: s.max_tokens,
            row_bytes: s.row_bytes,
            out_row_bytes: s.out_row_bytes,
            side_bytes: s.side_bytes,
        }
    }
}

/// A mesh to join: its configuration. `Mesh(scheduler, attention, ffn, ...)`
/// from arguments, `Mesh.from_env()` from `AFMESH_*` / `DMLC_*`.
///
/// Keywords: `role` ("attention"/"ffn"), `rank` (preferred rank), `job`,
/// `host_id`, `transport` ("auto", "tcp", "shm"), `poll` (as AFMESH_POLL),
/// `setup_timeout` and `io_timeout` (seconds), `embed_scheduler` (run the
/// rendezvous in this rank), `token` (the cluster token), `cpu` (pin the
/// thread that joins, and so drives, the rank to this CPU; its waits then
/// spin without yielding, as AFMESH_CPU), `layout` ("slots" or
/// "matrix": every stage's dispatched rows one matrix on each FFN rank,
/// `Batch.matrix()`; as AFMESH_LAYOUT, every rank must agree).
#[pyclass(frozen, module = "afmesh._afmesh")]
pub struct Mesh {
    cfg: MeshConfig,
}

fn role_of(s: &str) -> PyResult<Role> {
    match s {
        "attention" | "worker" => Ok(Role::Attention),
        "ffn" | "server" => Ok(Role::Ffn),
        _ => Err(invalid(format!(
            "role={s:?}: expected \"attention\" or \"ffn\" (or \"worker\"/\"server\")"
        ))),
    }
}

/// What a join thread sends back: the rank (or why not) and the caller
/// memory it registered, dropped after the rank.
type Joined<R> = (afmesh::Result<R>, Keep);

#[pymethods]
impl Mesh {
    #[new]
    #[pyo3(signature = (scheduler, attention, ffn, *, role = None, rank = None, job = None,
        host_id = None, transport = None, poll = None, setup_timeout = None, io_timeout = None,
        embed_scheduler = false, token = None, cpu = None, layout = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        scheduler: String,
        attention: u32,
        ffn: u32,
        role: Option<&str>,
        rank: Option<u32>,
        job: Option<String>,
        host_id: Option<String>,
        transport: Option<&str>,
        poll: Option<&str>,
        setup_timeout: Option<f64>,
        io_timeout: Option<f64>,
        embed_scheduler: bool,
        token: Option<String>,
        cpu: Option<usize>,
        layout: Option<&str>,
    ) -> PyResult<Mesh> {
        let mut cfg = MeshConfig::new(scheduler, attention, ffn);
        cfg.role = role.map(role_of).transpose()?;
        cfg.rank = rank;
        if let Some(j) = job {
            cfg.job = j;
        }
        if let Some(h) = host_id {
            cfg.host_id = h;
        }
        if let Some(t) = transport {
            cfg.transport = TransportKind::parse(t).map_err(to_py)?;
        }
        if let Some(p) = poll {
            cfg.poll = PollPolicy::parse(p).map_err(to_py)?;
        }
        if let Some(s) = setup_timeout {
            cfg.setup_timeout = positive(s, "setup_timeout")?;
        }
        if let Some(s) = io_timeout {
            cfg.io_timeout = positive(s, "io_timeout")?;
        }
        cfg.embed_scheduler = embed_scheduler;
        cfg.token = token.map(Token::new).transpose().map_err(to_py)?;
        cfg.cpu = cpu;
        if let Some(l) = layout {
            cfg.layout = afmesh::StageLayout::parse(l).map_err(invalid)?;
        }
        Ok(Mesh { cfg })
    }

    /// A mesh configured from the environment (`AFMESH_*`, and the
    /// StepMesh/ps-lite `DMLC_*` names), read by the library itself.
    #[staticmethod]
    fn from_env() -> PyResult<Mesh> {
        Ok(Mesh {
            cfg: MeshConfig::from_env().map_err(to_py)?,
        })
    }

    /// Rendezvous server address, `host:port`.
    #[getter]
    fn scheduler(&self) -> String {
        self.cfg.scheduler.clone()
    }
    /// Number of attention ranks (M).
    #[getter]
    fn attention_ranks(&self) -> u32 {
        self.cfg.attention
    }
    /// Number of FFN ranks (N).
    #[getter]
    fn ffn_ranks(&self) -> u32 {
        self.cfg.ffn
    }
    /// The configured role, `"attention"`, `"ffn"` or None.
    #[getter]
    fn role(&self) -> Option<String> {
        self.cfg.role.map(|r| r.to_string())
    }
    /// The preferred rank within the role, if configured.
    #[getter]
    fn rank(&self) -> Option<u32> {
        self.cfg.rank
    }
    /// The instance group whose mesh this process joins (StepMesh's
    /// instance index; 0 without `DMLC_GROUP_SIZE`).
    #[getter]
    fn group(&self) -> u32 {
        self.cfg.group
    }
    /// Instance groups of the job (`DMLC_GROUP_SIZE`, default 1), each
    /// its own mesh.
    #[getter]
    fn groups(&self) -> u32 {
        self.cfg.group_size
    }

    fn __repr__(&self) -> String {
        format!(
            "Mesh(scheduler={:?}, attention={}, ffn={}, role={:?}, rank={:?}, transport={})",
            self.cfg.scheduler,
            self.cfg.attention,
            self.cfg.ffn,
            self.cfg.role.map(|r| r.to_string()),
            self.cfg.rank,
            self.cfg.transport
        )
    }

    /// Bytes of caller memory an attention rank needs for `spec`.
    fn attention_memory_len(&self, spec: &StageSpec) -> PyResult<usize> {
        afmesh::Mesh::new(self.cfg.clone())
            .attention_memory_len(spec.rust())
            .map_err(to_py)
    }

    /// Bytes of caller memory an FFN rank needs for `spec`.
    fn ffn_memory_len(&self, spec: &StageSpec) -> PyResult<usize> {
        afmesh::Mesh::new(self.cfg.clone())
            .ffn_memory_len(spec.rust())
            .map_err(to_py)
    }

    /// Joins as an attention rank. With `memory` (a writable, C-contiguous
    /// buffer of at least `attention_memory_len(spec)` bytes), combines land
    /// straight in it; it stays registered (and exported) until the rank
    /// and every view of it are gone. With `device` (a CUDA device
    /// ordinal), the stage memory is allocated on that GPU instead: links
    /// use the cuda transport, `dispatch` takes CUDA tensors and combine
    /// views are `DeviceView`s (`__cuda_array_interface__`). Blocks until
    /// the mesh forms (GIL released; Ctrl-C ends the wait).
    #[pyo3(signature = (spec, memory = None, device = None))]
    fn attention(
        &self,
        py: Python<'_>,
        spec: &StageSpec,
        memory: Option<&Bound<'_, PyAny>>,
        device: Option<i32>,
    ) -> PyResult<AttentionRank> {
        if memory.is_some() && device.is_some() {
            return Err(invalid("attention: give memory= or device=, not both"));
        }
        let (keep, region) = caller_region(memory, "attention memory")?;
        let mesh = afmesh::Mesh::new(self.cfg.clone());
        let spec = spec.rust();
        let (rank, keep) = join(py, self.cfg.setup_timeout, keep, move || {
            match (region, device) {
                (Some(r), _) => mesh.attention_with_region(spec, r),
                (None, Some(d)) => mesh.attention_on_device(spec, d),
                (None, None) => mesh.attention(spec),
            }
        })?;
        self.pin()?;
        Ok(AttentionRank::new(rank, keep))
    }

    /// Joins as an FFN rank; `memory` as for `attention` (input slots,
    /// `ffn_memory_len(spec)` bytes), `device` too (batch views are
    /// `DeviceView`s, `respond` takes CUDA tensors).
    #[pyo3(signature = (spec, memory = None, device = None))]
    fn ffn(
        &self,
        py: Python<'_>,
        spec: &StageSpec,
        memory: Option<&Bound<'_, PyAny>>,
        device: Option<i32>,
    ) -> PyResult<FfnRank> {
        if memory.is_some() && device.is_some() {
            return Err(invalid("ffn: give memory= or device=, not both"));
        }
        let (keep, region) = caller_region(memory, "ffn memory")?;
        let mesh = afmesh::Mesh::new(self.cfg.clone());
        let spec = spec.rust();
        let (rank, keep) = join(py, self.cfg.setup_timeout, keep, move || {
            match (region, device) {
                (Some(r), _) => mesh.ffn_with_region(spec, r),
                (None, Some(d)) => mesh.ffn_on_device(spec, d),
                (None, None) => mesh.ffn(spec),
            }
        })?;
        self.pin()?;
        Ok(FfnRank::new(rank, keep))
    }

    /// Joins in the configured role (`role=` or AFMESH_ROLE / DMLC_ROLE).
    #[pyo3(signature = (spec, memory = None, device = None))]
    fn join(
        &self,
        py: Python<'_>,
        spec: &StageSpec,
        memory: Option<&Bound<'_, PyAny>>,
        device: Option<i32>,
    ) -> PyResult<Py<PyAny>> {
        match self.cfg.role {
            Some(Role::Attention) => {
                Ok(Py::new(py, self.attention(py, spec, memory, device)?)?.into_any())
            }
            Some(Role::Ffn) => Ok(Py::new(py, self.ffn(py, spec, memory, device)?)?.into_any()),
            _ => Err(to_py(afmesh::Error::Config(
                "no role configured: set AFMESH_ROLE (or DMLC_ROLE), or pass role=".into(),
            ))),
        }
    }
}

impl Mesh {
    /// With `cpu=`: pins the calling thread, the one that will drive the
    /// rank (the library pinned the join thread, which is gone).
    fn pin(&self) -> PyResult<()> {
        match self.cfg.cpu {
            Some(cpu) => afmesh::transport::shm::sys::pin_to_cpu(cpu).map_err(|e| {
                to_py(afmesh::Error::Io {
                    op: format!("cpu={cpu}: pin the calling thread"),
                    source: e,
                })
            }),
            None => Ok(()),
        }
    }
}

fn positive(s: f64, what: &str) -> PyResult<Duration> {
    let d = seconds(s, what)?;
    if d < Duration::from_millis(1) {
        return Err(invalid(format!("{what}={s}: must be at least 0.001 s")));
    }
    Ok(d)
}

fn caller_region(
    memory: Option<&Bound<'_, PyAny>>,
    what: &str,
) -> PyResult<(Keep, Option<Region>)> {
    let Some(obj) = memory else {
        return Ok((None, None));
    };
    let held = Arc::new(Held::write(obj, what)?);
    let (ptr, len) = held.raw_parts();
    // SAFETY: `held` keeps the buffer exported (so valid and unmoved) for
    // as long as the region can be touched: the rank keeps it beside the
    // region and drops it after the rank, and every `Memory` a view holds
    // keeps a clone beside its clone of the region.
    let region =
        unsafe { Region::from_raw_parts(ptr, len) }.map_err(|e| invalid(format!("{what}: {e}")))?;
    Ok((Some(held), Some(region)))
}

/// Runs a join on its own thread (setup blocks for up to the setup
/// timeout) and waits for it with the GIL released, in slices, so that
/// Ctrl-C ends the wait. An abandoned join finishes on its thread and
/// drops what it got (the rank leaves the mesh).
fn join<R: Send + 'static>(
    py: Python<'_>,
    setup_timeout: Duration,
    keep: Keep,
    f: impl FnOnce() -> afmesh::Result<R> + Send + 'static,
) -> PyResult<(R, Keep)> {
    let (tx, rx) = std::sync::mpsc::channel::<Joined<R>>();
    std::thread::Builder::new()
        .name("afmesh-join".into())
        .spawn(move || {
            let r = f();
            // If nobody waits any more, the rank is dropped here, before
            // the caller memory it used.
            let _ = tx.send((r, keep));
        })
        .map_err(|e| {
            to_py(afmesh::Error::Io {
                op: "spawn join thread".into(),
                source: e,
            })
        })?;
    // The join bounds itself by the setup timeout; this bound only guards
    // against a join thread that never reports.
    let deadline = Instant::now() + setup_timeout * 2 + Duration::from_secs(5);
    let mut rx = rx;
    loop {
        // The receiver is not Sync: it moves to the detached closure and back.
        let (got, back) = py.detach(move || (rx.recv_timeout(SLICE), rx));
        rx = back;
        match got {
            Ok((Ok(rank), keep)) => return Ok((rank, keep)),
            Ok((Err(e), _)) => return Err(to_py(e)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                py.check_signals()?;
            }
            Err(_) => {
                return Err(to_py(afmesh::Error::Timeout {
                    op: "join",
                    peer: "the mesh".into(),
                    after: setup_timeout,
                }))
            }
        }
    }
}

/// A rendezvous server run inside this process (what `afmesh scheduler`
/// runs): it admits the mesh's ranks, hands out the address book, and
/// finishes when every rank has left.
#[pyclass(module = "afmesh._afmesh")]
pub struct Scheduler {
    handle: Option<afmesh::bootstrap::rendezvous::SchedulerHandle>,
    addr: String,
}

impl Scheduler {
    fn start(addr: &str, cfg: SchedulerConfig) -> PyResult<Scheduler> {
        let s = RustScheduler::bind(addr, cfg).map_err(to_py)?;
        let handle = s.spawn().map_err(to_py)?;
        Ok(Scheduler {
            addr: handle.addr().to_string(),
            handle: Some(handle),
        })
    }
}

#[pymethods]
impl Scheduler {
    /// Binds `addr` (`host:port`; port 0 picks one) and starts serving a
    /// mesh of `attention` + `ffn` ranks (`groups` of them, disjoint, as
    /// StepMesh's `DMLC_GROUP_SIZE` instance groups). `token` is the
    /// cluster token the ranks must prove (default: AFMESH_TOKEN /
    /// AFMESH_TOKEN_FILE).
    #[new]
    #[pyo3(signature = (addr, attention, ffn, *, job = None, token = None, join_timeout = 60.0, groups = 1))]
    fn new(
        addr: &str,
        attention: u32,
        ffn: u32,
        job: Option<String>,
        token: Option<String>,
        join_timeout: f64,
        groups: u32,
    ) -> PyResult<Scheduler> {
        if groups == 0 {
            return Err(invalid("groups=0: a job has at least one instance group"));
        }
        let token = match token {
            Some(t) => Some(Token::new(t).map_err(to_py)?),
            None => MeshConfig::token_from_env().map_err(to_py)?,
        };
        let cfg = SchedulerConfig {
            groups,
            attention: Some(attention),
            ffn: Some(ffn),
            job,
            join_timeout: positive(join_timeout, "join_timeout")?,
            token,
            ..SchedulerConfig::default()
        };
        Self::start(addr, cfg)
    }

    /// The job's scheduler as the environment describes it, read by the
    /// library like a rank's configuration (`AFMESH_SCHEDULER` or
    /// `DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT`, `AFMESH_NUM_ATTENTION` or
    /// `DMLC_NUM_WORKER`, `AFMESH_NUM_FFN` or `DMLC_NUM_SERVER`, one mesh
    /// per `DMLC_GROUP_SIZE` instance group, the job, the token,
    /// `AFMESH_SETUP_TIMEOUT_MS` as the join timeout); the role
    /// variables are not read (a StepMesh scheduler has
    /// `DMLC_ROLE=scheduler`). Binds and starts serving.
    #[staticmethod]
    fn from_env() -> PyResult<Scheduler> {
        let cfg = MeshConfig::from_lookup(|k| match k {
            "AFMESH_ROLE" | "DMLC_ROLE" => None,
            _ => std::env::var(k).ok(),
        })
        .map_err(to_py)?;
        Self::start(
            &cfg.scheduler,
            SchedulerConfig {
                groups: cfg.group_size,
                attention: Some(cfg.attention),
                ffn: Some(cfg.ffn),
                job: Some(cfg.job),
                join_timeout: cfg.setup_timeout,
                token: cfg.token,
                ..SchedulerConfig::default()
            },
        )
    }

    /// Where ranks connect (`host:port`, the bound port).
    #[getter]
    fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Whether the server has finished.
    #[getter]
    fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits up to `timeout` seconds for the server to finish (every rank
    /// left, or setup failed for good); returns a summary dict. GIL
    /// released; Ctrl-C ends the wait (the server keeps running).
    #[pyo3(signature = (timeout = 600.0))]
    fn wait(&mut self, py: Python<'_>, timeout: f64) -> PyResult<Py<PyAny>> {
        let timeout = seconds(timeout, "timeout")?;
        let start = Instant::now();
        loop {
            let done = self.handle.as_ref().is_none_or(|h| h.is_finished());
            if done {
                break;
            }
            if start.elapsed() >= timeout {
                return Err(to_py(afmesh::Error::Timeout {
                    op: "scheduler wait",
                    peer: "the mesh's ranks to leave".into(),
                    after: timeout,
                }));
            }
            py.detach(|| std::thread::sleep(Duration::from_millis(5)));
            py.check_signals()?;
        }
        let Some(h) = self.handle.take() else {
            return Err(invalid("the scheduler was already waited for"));
        };
        let s = py.detach(|| h.join()).map_err(to_py)?;
        let d = pyo3::types::PyDict::new(py);
        d.set_item("epoch", s.epoch)?;
        d.set_item("groups", s.groups)?;
        d.set_item("attention", s.attention)?;
        d.set_item("ffn", s.ffn)?;
        d.set_item("dropped", s.dropped)?;
        d.set_item("auth_failures", s.auth_failures)?;
        d.set_item("failed_attempts", s.failed_attempts)?;
        Ok(d.into_any().unbind())
    }
}
