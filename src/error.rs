//! The one error type of afmesh. Variants are named after what failed and
//! carry enough context to act on; nothing a peer does turns into a panic.

use std::time::Duration;

/// Which side of a link a peer is on, and its rank there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Attention rank `A<i>`.
    Attention(u32),
    /// FFN rank `F<j>`.
    Ffn(u32),
    /// The rendezvous server.
    Scheduler,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Attention(i) => write!(f, "A{i}"),
            Peer::Ffn(j) => write!(f, "F{j}"),
            Peer::Scheduler => write!(f, "scheduler"),
        }
    }
}

/// Every error afmesh returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bounded wait ran out.
    #[error("timeout: {op} waited {after:?} for {peer}")]
    Timeout {
        /// What was waiting (`"combine"`, `"get_batch"`, `"connect"` ...).
        op: &'static str,
        /// Who it was waiting for, as text (one peer, or a list).
        peer: String,
        /// How long it waited.
        after: Duration,
    },
    /// A peer's link went down (process died, connection reset, link killed).
    #[error("peer lost: {peer}: {reason}")]
    PeerLost {
        /// The peer that is gone.
        peer: Peer,
        /// What the transport saw.
        reason: String,
    },
    /// A stage was dispatched again before its combine completed.
    #[error("stage {stage} is busy: its previous dispatch has not been combined")]
    StageBusy {
        /// The stage.
        stage: u32,
    },
    /// A peer sent bytes that do not decode or do not fit the protocol.
    #[error("bad frame from {peer}: {reason}")]
    BadFrame {
        /// Who sent it.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// A buffer passed in or registered has the wrong size.
    #[error("buffer: {what}: need {need} bytes, got {got}")]
    BufferSize {
        /// Which buffer.
        what: String,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// A link's send window is full: nothing was posted; make progress and
    /// post again.
    #[error("send window to {peer} is full ({window} writes in flight)")]
    Backpressure {
        /// The peer.
        peer: String,
        /// The window.
        window: usize,
    },
    /// Authentication or job identity failed.
    #[error("auth: {0}")]
    Auth(String),
    /// Bad configuration: the message names the setting.
    #[error("config: {0}")]
    Config(String),
    /// The API was misused: a handle or batch that is not in flight here,
    /// a stage out of range, a wrong number of buffers. Nothing changed;
    /// the message names the argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Asked for something this build or backend does not do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The rank or mesh was shut down.
    #[error("shut down: {0}")]
    Shutdown(String),
    /// A wait was woken by [`Interrupter::interrupt`](crate::Interrupter)
    /// from another thread. Nothing was consumed; the rank stays usable.
    #[error("interrupted: woken by Interrupter::interrupt")]
    Interrupted,
    /// An operating-system error, with what was being done.
    #[error("io: {op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// `Result` with afmesh's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
