//! afmesh's errors as Python exceptions: one class per `afmesh::Error`
//! variant, all under `afmesh.Error`, each carrying the library's message.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    afmesh,
    Error,
    PyException,
    "Base class of every afmesh error; the message is the library's."
);
create_exception!(
    afmesh,
    Timeout,
    Error,
    "A bounded wait ran out (the message names what waited, for whom, how long)."
);
create_exception!(
    afmesh,
    PeerLost,
    Error,
    "A peer's link went down: the process died, the connection reset."
);
create_exception!(
    afmesh,
    StageBusy,
    Error,
    "A stage was dispatched again before its combine was taken."
);
create_exception!(
    afmesh,
    BadFrame,
    Error,
    "A peer sent bytes that do not decode or do not fit the protocol."
);
create_exception!(
    afmesh,
    Backpressure,
    Error,
    "A link's send window is full; nothing was posted."
);
create_exception!(
    afmesh,
    AuthError,
    Error,
    "Authentication (the cluster token) or job identity failed."
);
create_exception!(
    afmesh,
    ConfigError,
    Error,
    "Bad configuration; the message names the setting."
);
create_exception!(
    afmesh,
    InvalidArgument,
    Error,
    "The API was misused; nothing changed. The message names the argument."
);
create_exception!(
    afmesh,
    BufferSize,
    InvalidArgument,
    "A buffer passed in has the wrong size."
);
create_exception!(
    afmesh,
    StaleView,
    InvalidArgument,
    "A batch or combine view was used after its memory was handed back (respond, the stage's next dispatch, shutdown)."
);
create_exception!(
    afmesh,
    Busy,
    Error,
    "Another thread is inside a call on this rank (one call at a time per rank; interrupt() is the exception)."
);
create_exception!(
    afmesh,
    Unsupported,
    Error,
    "Asked for something this build or backend does not do."
);
create_exception!(
    afmesh,
    ShutdownError,
    Error,
    "The rank or mesh was shut down."
);
create_exception!(
    afmesh,
    Interrupted,
    Error,
    "A wait was ended by interrupt() from another thread; nothing was consumed."
);
create_exception!(afmesh, IoError, Error, "An operating-system error.");

/// The exception for `e`, with the library's message.
pub fn to_py(e: afmesh::Error) -> PyErr {
    use afmesh::Error as E;
    let msg = e.to_string();
    match e {
        E::Timeout { .. } => Timeout::new_err(msg),
        E::PeerLost { .. } => PeerLost::new_err(msg),
        E::StageBusy { .. } => StageBusy::new_err(msg),
        E::BadFrame { .. } => BadFrame::new_err(msg),
        E::BufferSize { .. } => BufferSize::new_err(msg),
        E::Backpressure { .. } => Backpressure::new_err(msg),
        E::Auth(_) => AuthError::new_err(msg),
        E::Config(_) => ConfigError::new_err(msg),
        E::InvalidArgument(_) => InvalidArgument::new_err(msg),
        E::Unsupported(_) => Unsupported::new_err(msg),
        E::Shutdown(_) => ShutdownError::new_err(msg),
        E::Interrupted => Interrupted::new_err(msg),
        E::Io { .. } => IoError::new_err(msg),
        _ => Error::new_err(msg),
    }
}

pub fn invalid(msg: impl Into<String>) -> PyErr {
    InvalidArgument::new_err(msg.into())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("PeerLost", py.get_type::<PeerLost>())?;
    m.add("StageBusy", py.get_type::<StageBusy>())?;
    m.add("BadFrame", py.get_type::<BadFrame>())?;
    m.add("Backpressure", py.get_type::<Backpressure>())?;
    m.add("AuthError", py.get_type::<AuthError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("BufferSize", py.get_type::<BufferSize>())?;
    m.add("StaleView", py.get_type::<StaleView>())?;
    m.add("Busy", py.get_type::<Busy>())?;
    m.add("Unsupported", py.get_type::<Unsupported>())?;
    m.add("ShutdownError", py.get_type::<ShutdownError>())?;
    m.add("Interrupted", py.get_type::<Interrupted>())?;
    m.add("IoError", py.get_type::<IoError>())?;
    Ok(())
}
