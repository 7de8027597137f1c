//! Mesh configuration, from code or from the environment.
//!
//! `AFMESH_*` names come first; the StepMesh/ps-lite names (`DMLC_*`) are
//! accepted so existing launch scripts work. A bad or missing variable is an
//! error that names it.

use std::time::Duration;

use crate::bootstrap::Token;
use crate::error::{Error, Result};
use crate::proto::Role;
use crate::transport::PollPolicy;

/// Which transport links use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportKind {
    /// Per link: shm between ranks with the same host id, else tcp.
    Auto,
    /// TCP sockets.
    Tcp,
    /// Shared memory (every link must be same-host).
    Shm,
}

impl TransportKind {
    /// Parses `auto`, `tcp` or `shm`.
    pub fn parse(s: &str) -> Result<TransportKind> {
        match s {
            "auto" => Ok(TransportKind::Auto),
            "tcp" => Ok(TransportKind::Tcp),
            "shm" => Ok(TransportKind::Shm),
            "verbs" => Err(Error::Unsupported(
                "transport \"verbs\" is not in this build yet; use auto, tcp or shm".into(),
            )),
            _ => Err(Error::config(format!(
                "transport {s:?}: expected auto, tcp or shm"
            ))),
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Shm => "shm",
        })
    }
}

/// How a rank joins its mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The role, when it comes from configuration (`AFMESH_ROLE` or
    /// `DMLC_ROLE`); `Mesh::join` needs it, `Mesh::attention`/`ffn` check it.
    pub role: Option<Role>,
    /// Rendezvous server, `host:port`.
    pub scheduler: String,
    /// Attention ranks (M).
    pub attention: u32,
    /// FFN ranks (N).
    pub ffn: u32,
    /// Preferred rank within the role.
    pub rank: Option<u32>,
    /// Job name: ranks of another job are refused.
    pub job: String,
    /// Host identity (ranks with the same one share a host).
    pub host_id: String,
    /// Transport for links.
    pub transport: TransportKind,
    /// How waits wait.
    pub poll: PollPolicy,
    /// Bound on joining: connecting, the address book, links, the barrier.
    pub setup_timeout: Duration,
    /// Bound on any one blocking socket write.
    pub io_timeout: Duration,
    /// How long a link may stay silent and unreachable before its peer is
    /// declared lost (`AFMESH_LIVENESS_MS`; tcp: keepalive probes and
    /// `TCP_USER_TIMEOUT`, whole seconds for the probes, so bounds under
    /// 2 s are met to within a second).
    pub liveness: Duration,
    /// Every message carries a CRC32C of its bytes, checked on arrival; a
    /// mismatch is `BadFrame` naming the peer (`AFMESH_CHECKSUM=1`; off by
    /// default). Every rank of a job must agree.
    pub checksum: bool,
    /// Run the rendezvous server inside this rank, at `scheduler`.
    pub embed_scheduler: bool,
    /// Pin the joining thread (the one that will drive the rank) to this CPU.
    pub cpu: Option<usize>,
    /// The cluster token this rank proves to the scheduler and to its
    /// peers (`AFMESH_TOKEN`, or `AFMESH_TOKEN_FILE`); `None`: no
    /// authentication, and a scheduler that has a token refuses the rank.
    pub token: Option<Token>,
}

impl MeshConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(scheduler: impl Into<String>, attention: u32, ffn: u32) -> MeshConfig {
        MeshConfig {
            role: None,
            scheduler: scheduler.into(),
            attention,
            ffn,
            rank: None,
            job: "afmesh".into(),
            host_id: default_host_id(),
            transport: TransportKind::Auto,
            poll: PollPolicy::default(),
            setup_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(10),
            liveness: Duration::from_secs(5),
            checksum: false,
            embed_scheduler: false,
            cpu: None,
            token: None,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<MeshConfig> {
        MeshConfig::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<MeshConfig> {
        let pick = |a: &str, b: &str| {
            get(a)
                .map(|v| (a.to_string(), v))
                .or_else(|| get(b).map(|v| (b.to_string(), v)))
        };
        let need = |a: &str, b: &str| {
            pick(a, b).ok_or_else(|| Error::config(format!("{a} (or {b}) is not set")))
        };
        let num = |(k, v): (String, String)| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| Error::config(format!("{k}={v:?} is not a non-negative integer")))
        };
        let scheduler = match get("AFMESH_SCHEDULER") {
            Some(s) => s,
            None => {
                let host = get("DMLC_PS_ROOT_URI").ok_or_else(|| {
                    Error::config(
                        "AFMESH_SCHEDULER (or DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT) is not set",
                    )
                })?;
                let port = num(need("DMLC_PS_ROOT_PORT", "DMLC_PS_ROOT_PORT")?)?;
                format!("{host}:{port}")
            }
        };
        let attention = num(need("AFMESH_NUM_ATTENTION", "DMLC_NUM_WORKER")?)?;
        let ffn = num(need("AFMESH_NUM_FFN", "DMLC_NUM_SERVER")?)?;
        let mut c = MeshConfig::new(scheduler, attention, ffn);
        if let Some((k, v)) = pick("AFMESH_ROLE", "DMLC_ROLE") {
            c.role = Some(match v.trim() {
                "attention" | "worker" => Role::Attention,
                "ffn" | "server" => Role::Ffn,
                _ => {
                    return Err(Error::config(format!(
                        "{k}={v:?}: expected attention|ffn (or worker|server)"
                    )))
                }
            });
        }
        if let Some(kv) = pick("AFMESH_RANK", "DMLC_NODE_RANK") {
            c.rank = Some(num(kv)?);
        }
        if let Some(j) = get("AFMESH_JOB") {
            c.job = j;
        }
        if let Some(h) = get("AFMESH_HOST_ID") {
            c.host_id = h;
        }
        if let Some(t) = get("AFMESH_TRANSPORT") {
            c.transport = TransportKind::parse(t.trim())
                .map_err(|e| Error::config(format!("AFMESH_TRANSPORT: {e}")))?;
        }
        if let Some(p) = get("AFMESH_POLL") {
            c.poll = PollPolicy::parse(&p)?;
        }
        // A zero bound would fail every wait at once: refused, named.
        let millis = |(k, v): (String, String)| match num((k.clone(), v.clone()))? {
            0 => Err(Error::config(format!(
                "{k}={v:?}: a timeout must be at least 1 ms"
            ))),
            ms => Ok(Duration::from_millis(u64::from(ms))),
        };
        if let Some(kv) = pick("AFMESH_SETUP_TIMEOUT_MS", "AFMESH_SETUP_TIMEOUT_MS") {
            c.setup_timeout = millis(kv)?;
        }
        if let Some(kv) = pick("AFMESH_IO_TIMEOUT_MS", "AFMESH_IO_TIMEOUT_MS") {
            c.io_timeout = millis(kv)?;
        }
        if let Some(kv) = pick("AFMESH_LIVENESS_MS", "AFMESH_LIVENESS_MS") {
            c.liveness = millis(kv)?;
        }
        if let Some(kv) = pick("AFMESH_CPU", "AFMESH_CPU") {
            c.cpu = Some(num(kv)? as usize);
        }
        c.token = token_from(&get)?;
        if let Some(v) = get("AFMESH_CHECKSUM") {
            c.checksum = match v.trim() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                _ => {
                    return Err(Error::config(format!(
                        "AFMESH_CHECKSUM={v:?}: expected 0 or 1"
                    )))
                }
            };
        }
        if let Some(v) = get("AFMESH_EMBED_SCHEDULER") {
            c.embed_scheduler = match v.trim() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                _ => {
                    return Err(Error::config(format!(
                        "AFMESH_EMBED_SCHEDULER={v:?}: expected 0 or 1"
                    )))
                }
            };
        }
        Ok(c)
    }
}

impl MeshConfig {
    /// The cluster token from `AFMESH_TOKEN` or `AFMESH_TOKEN_FILE` (what
    /// [`MeshConfig::from_env`] reads; the scheduler reads the same).
    pub fn token_from_env() -> Result<Option<Token>> {
        token_from(&|k: &str| std::env::var(k).ok())
    }
}

fn token_from(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Token>> {
    Ok(match (get("AFMESH_TOKEN"), get("AFMESH_TOKEN_FILE")) {
        (Some(_), Some(_)) => {
            return Err(Error::config(
                "AFMESH_TOKEN and AFMESH_TOKEN_FILE are both set: set one",
            ))
        }
        (Some(t), None) => {
            Some(Token::new(t).map_err(|e| Error::config(format!("AFMESH_TOKEN: {e}")))?)
        }
        (None, Some(f)) => Some(
            Token::from_file(&f).map_err(|e| Error::config(format!("AFMESH_TOKEN_FILE: {e}")))?,
        ),
        (None, None) => None,
    })
}

fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<MeshConfig> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        MeshConfig::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn dmlc_names_work() {
        let c = cfg(&[
            ("DMLC_ROLE", "server"),
            ("DMLC_PS_ROOT_URI", "10.0.0.1"),
            ("DMLC_PS_ROOT_PORT", "8123"),
            ("DMLC_NUM_WORKER", "2"),
            ("DMLC_NUM_SERVER", "4"),
            ("DMLC_NODE_RANK", "1"),
        ])
        .unwrap();
        assert_eq!(c.scheduler, "10.0.0.1:8123");
        assert_eq!(
            (c.attention, c.ffn, c.rank, c.role),
            (2, 4, Some(1), Some(Role::Ffn))
        );
    }

    #[test]
    fn afmesh_names_win() {
        let c = cfg(&[
            ("AFMESH_SCHEDULER", "h:1"),
            ("DMLC_PS_ROOT_URI", "x"),
            ("AFMESH_NUM_ATTENTION", "3"),
            ("DMLC_NUM_WORKER", "9"),
            ("AFMESH_NUM_FFN", "1"),
            ("AFMESH_ROLE", "attention"),
            ("AFMESH_POLL", "spin"),
        ])
        .unwrap();
        assert_eq!((c.scheduler.as_str(), c.attention, c.ffn), ("h:1", 3, 1));
        assert_eq!(c.poll, PollPolicy::Spin);
    }

    #[test]
    fn transport_and_cpu() {
        let base = [
            ("AFMESH_SCHEDULER", "h:1"),
            ("AFMESH_NUM_ATTENTION", "1"),
            ("AFMESH_NUM_FFN", "1"),
        ];
        let with = |extra: (&str, &str)| {
            let mut v = base.to_vec();
            v.push(extra);
            cfg(&v)
        };
        assert_eq!(
            with(("AFMESH_TRANSPORT", "shm")).unwrap().transport,
            TransportKind::Shm
        );
        assert_eq!(with(("AFMESH_CPU", "1")).unwrap().cpu, Some(1));
        let e = with(("AFMESH_TRANSPORT", "pigeon"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AFMESH_TRANSPORT") && e.contains("pigeon"),
            "{e}"
        );
        let e = with(("AFMESH_CPU", "first")).unwrap_err().to_string();
        assert!(e.contains("AFMESH_CPU"), "{e}");
        assert_eq!(cfg(&base).unwrap().transport, TransportKind::Auto);
    }

    #[test]
    fn token_from_the_environment_or_a_file() {
        let base = [
            ("AFMESH_SCHEDULER", "h:1"),
            ("AFMESH_NUM_ATTENTION", "1"),
            ("AFMESH_NUM_FFN", "1"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            cfg(&v)
        };
        assert!(with(&[]).unwrap().token.is_none());
        let c = with(&[("AFMESH_TOKEN", "s3cret")]).unwrap();
        assert!(c.token.is_some());
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug hides the token"
        );
        let path = std::env::temp_dir().join(format!("afmesh-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let p = path.to_string_lossy().into_owned();
        assert!(with(&[("AFMESH_TOKEN_FILE", &p)]).unwrap().token.is_some());
        let e = with(&[("AFMESH_TOKEN_FILE", &p), ("AFMESH_TOKEN", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("both set"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = with(&[("AFMESH_TOKEN_FILE", &p)]).unwrap_err().to_string();
        assert!(e.contains("AFMESH_TOKEN_FILE") && e.contains(&p), "{e}");
        let e = with(&[("AFMESH_TOKEN", " ")]).unwrap_err().to_string();
        assert!(e.contains("AFMESH_TOKEN") && e.contains("empty"), "{e}");
    }

    #[test]
    fn errors_name_the_variable() {
        let e = cfg(&[("AFMESH_SCHEDULER", "h:1"), ("AFMESH_NUM_FFN", "1")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AFMESH_NUM_ATTENTION") && e.contains("DMLC_NUM_WORKER"),
            "{e}"
        );
        let e = cfg(&[
            ("AFMESH_SCHEDULER", "h:1"),
            ("DMLC_NUM_WORKER", "two"),
            ("AFMESH_NUM_FFN", "1"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("DMLC_NUM_WORKER=\"two\""), "{e}");
        let e = cfg(&[
            ("AFMESH_SCHEDULER", "h:1"),
            ("DMLC_NUM_WORKER", "1"),
            ("AFMESH_NUM_FFN", "1"),
            ("DMLC_ROLE", "scheduler"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("DMLC_ROLE"), "{e}");
        let e = cfg(&[("DMLC_PS_ROOT_URI", "h")]).unwrap_err().to_string();
        assert!(e.contains("DMLC_PS_ROOT_PORT"), "{e}");
    }

    #[test]
    fn zero_timeouts_are_refused_by_name() {
        for var in ["AFMESH_IO_TIMEOUT_MS", "AFMESH_SETUP_TIMEOUT_MS"] {
            let e = cfg(&[
                ("AFMESH_SCHEDULER", "h:1"),
                ("AFMESH_NUM_ATTENTION", "1"),
                ("AFMESH_NUM_FFN", "1"),
                (var, "0"),
            ])
            .unwrap_err()
            .to_string();
            assert!(e.contains(var) && e.contains("at least 1 ms"), "{e}");
            let c = cfg(&[
                ("AFMESH_SCHEDULER", "h:1"),
                ("AFMESH_NUM_ATTENTION", "1"),
                ("AFMESH_NUM_FFN", "1"),
                (var, "1"),
            ])
            .unwrap();
            assert_eq!(c.io_timeout.min(c.setup_timeout), Duration::from_millis(1));
        }
    }
}
