//! Streams and events: where copies are ordered, and how their completion is seen.

use super::*;

/// A stream of a device, destroyed on drop.
#[derive(Debug)]
pub struct Stream {
    raw: usize,
    device: Device,
}

// SAFETY: a CUstream handle may be used from any thread once its context
// is current there (every use binds it first).
unsafe impl Send for Stream {}

impl Stream {
    /// A new non-blocking stream on `device`.
    pub fn new(device: &Device) -> Result<Stream> {
        Stream::with_flags(device, driver::CU_STREAM_NON_BLOCKING)
    }

    /// A new blocking stream on `device`: its work waits for what was
    /// enqueued before on the legacy default stream.
    pub fn blocking(device: &Device) -> Result<Stream> {
        Stream::with_flags(device, 0)
    }

    fn with_flags(device: &Device, flags: u32) -> Result<Stream> {
        let d = driver()?;
        device.bind()?;
        let mut s: CuStream = std::ptr::null_mut();
        check(
            // SAFETY: valid out-pointer; the context is current.
            unsafe { (d.stream_create)(&mut s, flags) },
            || "cuStreamCreate".into(),
        )?;
        Ok(Stream {
            raw: s as usize,
            device: *device,
        })
    }

    /// The raw handle.
    pub fn raw(&self) -> CuStream {
        self.raw as CuStream
    }

    /// Enqueues a copy of `n` bytes from `src` to `dst` (unified
    /// addresses; device to device goes over the copy engines).
    ///
    /// # Safety
    /// Both ranges must stay valid until the copy has completed on the
    /// stream (an event recorded after it completes).
    pub unsafe fn copy_async(&self, dst: u64, src: u64, n: usize) -> Result<()> {
        let d = driver()?;
        // SAFETY: the caller's contract.
        check(unsafe { (d.memcpy_async)(dst, src, n, self.raw()) }, || {
            format!("cuMemcpyAsync({n} bytes)")
        })
    }

    /// Enqueues a peer copy (`cuMemcpyPeerAsync`) from `src` on device
    /// `from` to `dst` on device `to`.
    ///
    /// # Safety
    /// As for [`Stream::copy_async`].
    pub unsafe fn copy_peer_async(
        &self,
        dst: u64,
        to: &Device,
        src: u64,
        from: &Device,
        n: usize,
    ) -> Result<()> {
        let d = driver()?;
        check(
            // SAFETY: the caller's contract; contexts are retained primaries.
            unsafe { (d.memcpy_peer_async)(dst, to.ctx(), src, from.ctx(), n, self.raw()) },
            || format!("cuMemcpyPeerAsync({n} bytes)"),
        )
    }

    /// Makes later work on this stream wait for `event`.
    pub fn wait(&self, event: &Event) -> Result<()> {
        let d = driver()?;
        check(
            // SAFETY: live handles.
            unsafe { (d.stream_wait_event)(self.raw(), event.raw(), 0) },
            || "cuStreamWaitEvent".into(),
        )
    }

    /// Whether all work on the stream is done (`cuStreamQuery`, without
    /// binding: the caller's context must be current); an error if some
    /// of it failed.
    pub fn idle(&self) -> Result<bool> {
        let d = driver()?;
        // SAFETY: a live stream.
        let rc = unsafe { (d.stream_query)(self.raw()) };
        if rc == driver::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(rc, || "cuStreamQuery".into())?;
        Ok(true)
    }

    /// Blocks until all work on the stream is done.
    pub fn synchronize(&self) -> Result<()> {
        let d = driver()?;
        self.device.bind()?;
        // SAFETY: a live stream.
        check(unsafe { (d.stream_synchronize)(self.raw()) }, || {
            "cuStreamSynchronize".into()
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            let _ = self.device.bind();
            // SAFETY: our stream, destroyed once.
            let _ = unsafe { (d.stream_destroy)(self.raw()) };
        }
    }
}

/// An event (without timing unless asked), destroyed on drop.
#[derive(Debug)]
pub struct Event {
    raw: usize,
    device: Device,
}

// SAFETY: as for `Stream`.
unsafe impl Send for Event {}

impl Event {
    /// A new event on `device`; `timing` for [`Event::elapsed_ms`].
    pub fn new(device: &Device, timing: bool) -> Result<Event> {
        let d = driver()?;
        device.bind()?;
        let mut e: CuEvent = std::ptr::null_mut();
        let flags = if timing {
            driver::CU_EVENT_DEFAULT
        } else {
            driver::CU_EVENT_DISABLE_TIMING
        };
        // SAFETY: valid out-pointer; context current.
        check(unsafe { (d.event_create)(&mut e, flags) }, || {
            "cuEventCreate".into()
        })?;
        Ok(Event {
            raw: e as usize,
            device: *device,
        })
    }

    /// The raw handle.
    pub fn raw(&self) -> CuEvent {
        self.raw as CuEvent
    }

    /// Records the event at the current end of `stream` (raw handle, so a
    /// caller's stream works too).
    ///
    /// # Safety
    /// `stream` must be a live stream of this event's device (or null, the
    /// legacy default stream).
    pub unsafe fn record_raw(&self, stream: CuStream) -> Result<()> {
        let d = driver()?;
        // SAFETY: a live event; the caller's contract covers `stream`.
        check(unsafe { (d.event_record)(self.raw(), stream) }, || {
            "cuEventRecord".into()
        })
    }

    /// Records the event on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: `stream` is a live stream we own.
        unsafe { self.record_raw(stream.raw()) }
    }

    /// Whether the work before the record has completed; an error if it
    /// failed.
    pub fn done(&self) -> Result<bool> {
        let d = driver()?;
        // SAFETY: a live event.
        let rc = unsafe { (d.event_query)(self.raw()) };
        if rc == driver::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(rc, || "cuEventQuery".into())?;
        Ok(true)
    }

    /// Blocks until the event completes.
    pub fn synchronize(&self) -> Result<()> {
        let d = driver()?;
        self.device.bind()?;
        // SAFETY: a live event.
        check(unsafe { (d.event_synchronize)(self.raw()) }, || {
            "cuEventSynchronize".into()
        })
    }

    /// Milliseconds between `start` and this event (both timing events).
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32> {
        let d = driver()?;
        let mut ms = 0f32;
        check(
            // SAFETY: live events and a valid out-pointer.
            unsafe { (d.event_elapsed_time)(&mut ms, start.raw(), self.raw()) },
            || "cuEventElapsedTime".into(),
        )?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            let _ = self.device.bind();
            // SAFETY: our event, destroyed once.
            let _ = unsafe { (d.event_destroy)(self.raw()) };
        }
    }
}
