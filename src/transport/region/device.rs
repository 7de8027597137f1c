//! Device regions: GPU memory the library allocates or the caller lends,
//! host memory standing in for it in tests, and what device send memory
//! carries beside its bytes (a pinned host shadow, a fill stream, a host
//! mirror that peers write headers into).

use super::*;

impl Region {
    /// `len` zeroed bytes of memory on CUDA device `device`, allocated by
    /// the library ([`crate::Error::Unsupported`] where CUDA is not
    /// usable).
    pub fn alloc_device(device: i32, len: usize) -> crate::Result<Region> {
        let mem = crate::cuda::DeviceMemory::alloc(device, len)?;
        let ptr = NonNull::new(mem.ptr() as usize as *mut u8)
            .ok_or_else(|| crate::Error::invalid("cuMemAlloc returned address 0"))?;
        Ok(Region {
            ptr,
            len,
            owner: Owner::Device(mem),
            kind: MemoryKind::Cuda { device },
            shadow: None,
            fill: None,
            mirror: std::sync::OnceLock::new(),
        })
    }

    /// Caller device memory (a tensor's `data_ptr()`): `len` bytes at
    /// device address `ptr`, which must lie inside one CUDA allocation (the
    /// driver is asked; its device becomes the region's).
    ///
    /// # Safety
    /// The memory must stay allocated, and be left to the library while
    /// peers may write it, until the region (and every rank holding it) is
    /// dropped.
    pub unsafe fn from_device_ptr(ptr: u64, len: usize) -> crate::Result<Region> {
        let info = crate::cuda::pointer_info(ptr, len)?;
        let p = NonNull::new(ptr as usize as *mut u8)
            .ok_or_else(|| crate::Error::invalid("device pointer is 0"))?;
        Ok(Region {
            ptr: p,
            len,
            owner: Owner::DeviceBorrowed,
            kind: MemoryKind::Cuda {
                device: info.device,
            },
            shadow: None,
            fill: None,
            mirror: std::sync::OnceLock::new(),
        })
    }

    /// Host memory labelled as `kind`: lets the memory-kind plumbing (which
    /// backend registers what, what views say) be tested without a GPU,
    /// with host memory standing in for the device's. Not for real use.
    #[doc(hidden)]
    pub fn host_standing_in_for(kind: MemoryKind, len: usize) -> Result<Region, String> {
        let mut r = Region::alloc(len)?;
        r.kind = kind;
        Ok(r)
    }

    /// Gives device memory a pinned host shadow of its length (send
    /// slots: headers are staged through it).
    pub(crate) fn add_shadow(&mut self) -> crate::Result<()> {
        if let (true, MemoryKind::Cuda { device }) = (self.on_device(), self.kind) {
            self.shadow = Some(crate::cuda::Pinned::new(device, self.len)?);
            self.fill = Some(crate::cuda::Stream::blocking(&crate::cuda::Device::get(
                device,
            )?)?);
        }
        Ok(())
    }

    /// The stream fills of this (device send) memory are enqueued on; null
    /// (the legacy default stream) where it has none.
    pub(crate) fn fill_stream(&self) -> crate::cuda::CuStream {
        self.fill
            .as_ref()
            .map_or(std::ptr::null_mut(), crate::cuda::Stream::raw)
    }

    /// The pinned host shadow, if any.
    pub(crate) fn shadow(&self) -> Option<&crate::cuda::Pinned> {
        self.shadow.as_ref()
    }

    /// Sets the host mirror that peers write headers into (once; `false`
    /// if one was set or the lengths differ).
    pub(crate) fn set_mirror(&self, mirror: Arc<Region>) -> bool {
        mirror.len == self.len && self.mirror.set(mirror).is_ok()
    }

    /// Copies a message header at `offset` out: from the host mirror where
    /// the memory has one (every writer puts the header there too), else
    /// as [`Region::copy_out`].
    pub fn copy_header(&self, offset: usize, out: &mut [u8]) -> Result<(), String> {
        match self.mirror.get() {
            Some(m) => m.copy_out(offset, out),
            None => self.copy_out(offset, out),
        }
    }
}
