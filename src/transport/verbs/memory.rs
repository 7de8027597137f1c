//! Memory registration: host regions, and device regions by dma-buf or the
//! device pointer (GPUDirect), and waiting for a device slot's fills.

use super::*;

impl VerbsTransport {
    /// Registers `len` bytes at `offset` of dma-buf `fd` (device memory
    /// exported by its driver, e.g. by `cuda::dmabuf`) with
    /// `ibv_reg_dmabuf_mr`, addressed by peers as `iova`, writable by them
    /// if `access` says so; returns its (lkey, rkey). The registration is
    /// on the first rail (its keys are that NIC's) and is released with
    /// the transport. An error names the verb and errno.
    /// (`Transport::register` of a CUDA region does this itself.)
    ///
    /// # Safety
    /// `fd` is a dma-buf of at least `offset + len` bytes, open for the
    /// call (the MR holds its own reference to the buffer afterwards).
    pub unsafe fn register_dmabuf(
        &mut self,
        fd: i32,
        offset: u64,
        len: usize,
        iova: u64,
        access: Access,
    ) -> Result<(u32, u32)> {
        // SAFETY: the caller's contract.
        let mr = unsafe { self.reg_dmabuf_mr(0, fd, offset, len, iova, access) }?;
        self.loose.push(mr);
        // SAFETY: a live MR.
        Ok(unsafe { ((*mr).lkey, (*mr).rkey) })
    }

    /// `ibv_reg_dmabuf_mr` on rail `r`; the caller owns the MR.
    ///
    /// # Safety
    /// As [`VerbsTransport::register_dmabuf`].
    pub(super) unsafe fn reg_dmabuf_mr(
        &mut self,
        r: usize,
        fd: i32,
        offset: u64,
        len: usize,
        iova: u64,
        access: Access,
    ) -> Result<*mut ibv_mr> {
        let Some(f) = self.lib.ibv_reg_dmabuf_mr else {
            return Err(Error::Unsupported(format!(
                "verbs: {} has no ibv_reg_dmabuf_mr (rdma-core 34 or newer needed for device memory)",
                self.lib.from
            )));
        };
        let remote = if access == Access::RemoteWrite {
            IBV_ACCESS_REMOTE_WRITE
        } else {
            0
        };
        let flags = (IBV_ACCESS_LOCAL_WRITE | remote) as c_int;
        // SAFETY: a live PD; the fd and range are the caller's contract.
        let mr = unsafe { f(self.rails[r].pd, offset, len, iova, fd, flags) };
        if mr.is_null() {
            return Err(verbs_err(
                "ibv_reg_dmabuf_mr",
                &format!(
                    "dma-buf fd {fd}, {len} bytes at offset {offset} on {}",
                    self.rails[r].name()
                ),
                last_errno(),
            ));
        }
        Ok(mr)
    }

    /// `ibv_reg_mr` of `len` bytes at `addr` on rail `r` (relaxed ordering
    /// asked for, the plain call if the provider refuses it); the errno on
    /// failure.
    pub(super) fn reg_mr(
        &self,
        r: usize,
        addr: u64,
        len: usize,
        access: Access,
    ) -> std::result::Result<*mut ibv_mr, i32> {
        let lib = self.lib;
        let pd = self.rails[r].pd;
        let remote = if access == Access::RemoteWrite {
            IBV_ACCESS_REMOTE_WRITE
        } else {
            0
        };
        let base = (IBV_ACCESS_LOCAL_WRITE | remote) as c_int;
        let p = addr as *mut c_void;
        // Relaxed ordering is optional: a provider that does not know it
        // must ignore it; one that refuses it gets the plain call.
        let relaxed = base | IBV_ACCESS_RELAXED_ORDERING as c_int;
        // SAFETY: the caller's region is valid for `len` bytes for as long
        // as the MR lives (the `Mr` keeps an `Arc` of it).
        let mut mr = unsafe {
            match lib.ibv_reg_mr_iova2 {
                Some(f) => f(pd, p, len, addr, relaxed as u32),
                None => (lib.ibv_reg_mr)(pd, p, len, relaxed),
            }
        };
        if mr.is_null() {
            // SAFETY: as above.
            mr = unsafe { (lib.ibv_reg_mr)(pd, p, len, base) };
        }
        if mr.is_null() {
            Err(last_errno())
        } else {
            Ok(mr)
        }
    }

    /// Registers CUDA device memory for GPUDirect RDMA: the allocation
    /// exported as a dma-buf (`cuMemGetHandleForAddressRange`) and
    /// registered by `ibv_reg_dmabuf_mr`; where either refuses, `ibv_reg_mr`
    /// on the device pointer (which works with nvidia-peermem loaded).
    /// Without CUDA the error is CUDA's.
    pub(super) fn reg_device(
        &mut self,
        r: usize,
        region: &Region,
        device: i32,
        access: Access,
    ) -> Result<*mut ibv_mr> {
        let addr = region.addr();
        let len = region.len().max(1);
        let what = format!(
            "{len} bytes of CUDA device {device} memory at {addr:#x} on {}",
            self.rails[r].name()
        );
        if let Err(e) = crate::cuda::driver() {
            return Err(Error::Unsupported(format!(
                "verbs: cannot register {what} for GPUDirect RDMA: {e}"
            )));
        }
        let dmabuf = match crate::cuda::dmabuf(addr, len) {
            Ok(buf) => {
                use std::os::fd::AsRawFd;
                // SAFETY: `buf.fd` is the dma-buf of the whole allocation
                // (`buf.len` bytes) holding `[addr, addr + len)`, open
                // until `buf` drops after the call.
                match unsafe {
                    self.reg_dmabuf_mr(r, buf.fd.as_raw_fd(), buf.offset, len, addr, access)
                } {
                    Ok(mr) => return Ok(mr),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        match self.reg_mr(r, addr, len, access) {
            Ok(mr) => {
                tracing::info!(
                    "verbs: {what} registered by ibv_reg_mr on the device pointer (nvidia-peermem); dma-buf refused: {dmabuf}"
                );
                Ok(mr)
            }
            Err(errno) => Err(Error::Unsupported(format!(
                "verbs: cannot register {what} for GPUDirect RDMA: dma-buf: {dmabuf}; ibv_reg_mr on the device pointer (nvidia-peermem): {}",
                std::io::Error::from_raw_os_error(errno)
            ))),
        }
    }

    /// Waits (spin, then 20 µs sleeps, at most [`FILL_TIMEOUT`]) until the
    /// fills enqueued so far on `region`'s fill stream are done.
    pub(super) fn wait_fills(&mut self, region: &Region) -> Result<()> {
        let fill = region.fill_stream();
        let MemoryKind::Cuda { device } = region.kind() else {
            return Ok(());
        };
        if fill.is_null() {
            return Ok(());
        }
        if self.fill_event.is_none() {
            self.fill_event = Some(crate::cuda::Event::new(
                &crate::cuda::Device::get(device)?,
                false,
            )?);
        }
        let Some(e) = &self.fill_event else {
            return Ok(());
        };
        // SAFETY: the region's own live stream, of `device`.
        unsafe { e.record_raw(fill) }?;
        let start = Instant::now();
        let mut spins = 0u32;
        while !e.done()? {
            if spins < 256 {
                spins += 1;
                std::hint::spin_loop();
            } else if start.elapsed() > FILL_TIMEOUT {
                return Err(Error::Timeout {
                    op: "verbs: CUDA fills of a send slot",
                    peer: format!("CUDA device {device}"),
                    after: start.elapsed(),
                });
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
    }
}
