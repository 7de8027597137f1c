//! Shared memory: the one place where bytes are shared without Rust's
//! borrow rules, because peers write them.
//!
//! [`Region`] is registered memory. Peers (a tcp reader thread today, a
//! shared-memory peer process or a NIC later) write into it at any time the
//! protocol allows, while the owner reads other parts of it. The shared-memory
//! transport proper (segments between processes, rings) lands here too.

mod region;

pub use region::Region;
