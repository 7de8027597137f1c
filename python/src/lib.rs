//! `afmesh._afmesh`: the extension module behind the `afmesh` Python
//! package. It mirrors the Rust API (`Mesh`, `AttentionRank`, `FfnRank`,
//! `Batch`, `Combined`) with zero-copy buffers: caller memory goes in
//! through the buffer protocol, batch and combine views come out as numpy
//! arrays over the registered region. Every blocking call releases the GIL
//! and waits in slices that let Ctrl-C through.
//!
//! Like `ffi/`, this crate is a binding and so holds `unsafe`: the buffer
//! protocol calls (`buffer.rs`) and caller memory registration
//! (`mesh.rs`), each with its `// SAFETY:`.

#![deny(unsafe_op_in_unsafe_fn)]

mod attention;
mod buffer;
mod common;
mod errors;
mod ffn;
mod mesh;
mod views;
mod wait;

use pyo3::prelude::*;

/// Nanoseconds on the clock afmesh stamps traces with (wall clock).
#[pyfunction]
fn get_nanosecond() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[pymodule]
fn _afmesh(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<mesh::StageSpec>()?;
    m.add_class::<mesh::Mesh>()?;
    m.add_class::<mesh::Scheduler>()?;
    m.add_class::<attention::AttentionRank>()?;
    m.add_class::<attention::DispatchHandle>()?;
    m.add_class::<attention::Combined>()?;
    m.add_class::<ffn::FfnRank>()?;
    m.add_class::<ffn::Batch>()?;
    m.add_class::<common::Trace>()?;
    m.add_class::<views::Memory>()?;
    m.add_class::<views::DeviceView>()?;
    m.add_class::<views::Lease>()?;
    m.add_function(wrap_pyfunction!(get_nanosecond, m)?)?;
    Ok(())
}
