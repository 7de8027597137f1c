//! The receiving half of a tcp link: frames off the stream into the
//! registered region, with as few `read`s as the stream allows.
//!
//! A link reads ahead into a small inbox. A small frame — header and body
//! together, the common case of a ping-pong — comes in with one `read` and
//! its body is copied from the inbox into the region (a few hundred bytes;
//! a second system call would cost far more). A frame whose body is larger
//! than the inbox is read header first, then its body straight into the
//! region with one `readv` that also takes the next frame's header (or,
//! after small frames, the next inbox-full) behind it, so a stream of
//! frames costs one read per frame and large bodies are never staged.
//! Frames may be cut anywhere by the stream, and several may come in one
//! read; the inbox keeps what belongs to the next frame.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use super::frame::{self, FRAME_LEN};
use crate::transport::notice::Notice;
use crate::transport::{Completion, LinkId, LocalRegions};

/// Bytes a link reads ahead: one read brings a small frame whole.
pub(super) const INBOX: usize = 4096;

/// Where the reader is in the incoming stream.
#[derive(Debug, Clone, Copy)]
enum At {
    /// Between frames: the next bytes are a header.
    Header,
    /// Inside frame `h`'s body, `got` bytes of it landed.
    Body { h: Notice, got: u64 },
}

/// A link's read state: where it is in the stream, and the bytes read
/// ahead of it.
#[derive(Debug)]
pub(super) struct Rx {
    at: At,
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The last frame was larger than the inbox: read headers alone and
    /// bodies straight into the region, copying nothing.
    bulk: bool,
    /// Body bytes copied from the inbox into regions.
    pub(super) copied: u64,
}

impl Default for Rx {
    fn default() -> Rx {
        Rx {
            at: At::Header,
            buf: vec![0; INBOX].into_boxed_slice(),
            start: 0,
            end: 0,
            bulk: false,
            copied: 0,
        }
    }
}

/// What one pass over a link's socket found.
pub(super) enum Pass {
    /// The socket has nothing more now.
    Idle,
    /// A message arrived: the caller has news, so the pass ends (the next
    /// one goes on from the inbox; a burst costs no `read` that finds
    /// nothing).
    Landed,
    /// The link ended with this completion.
    End(Completion),
}

impl Rx {
    /// How much of the inbox one read may fill.
    fn cap(&self) -> usize {
        if self.bulk {
            FRAME_LEN
        } else {
            INBOX
        }
    }

    /// Stream bytes taken in so far and not yet consumed by a whole frame
    /// (tests: where a pass left off).
    #[cfg(test)]
    pub(super) fn pending(&self) -> u64 {
        let staged = (self.end - self.start) as u64;
        match self.at {
            At::Header => staged,
            At::Body { got, .. } => FRAME_LEN as u64 + got + staged,
        }
    }

    /// Reads and lands frames from `stream` until the socket has nothing
    /// more, a message lands, or the link ends.
    pub(super) fn pass(
        &mut self,
        stream: &mut TcpStream,
        peer: &str,
        link: LinkId,
        regions: &LocalRegions,
        out: &mut Vec<Completion>,
    ) -> Pass {
        let down = |reason: String| Pass::End(Completion::LinkDown { link, reason });
        loop {
            match self.at {
                At::Header if self.end - self.start >= FRAME_LEN => {
                    let mut b = [0u8; FRAME_LEN];
                    b.copy_from_slice(&self.buf[self.start..self.start + FRAME_LEN]);
                    self.start += FRAME_LEN;
                    let h = match frame::decode(&b) {
                        Ok(h) => h,
                        Err(e) => {
                            return Pass::End(Completion::LinkError {
                                link,
                                reason: format!("bad frame from {peer}: {e}"),
                            })
                        }
                    };
                    if h.close {
                        return Pass::End(Completion::LinkClosed { link });
                    }
                    let fits = regions
                        .target(h.region)
                        .ok_or_else(|| {
                            format!("write to region {}, which peers may not write", h.region)
                        })
                        .and_then(|r| r.check(h.offset, u64::from(h.len)).map(|_| ()));
                    if let Err(e) = fits {
                        return Pass::End(Completion::LinkError {
                            link,
                            reason: format!("from {peer}: {e}"),
                        });
                    }
                    self.bulk = h.len as usize > INBOX - FRAME_LEN;
                    if h.len > 0 {
                        self.at = At::Body { h, got: 0 };
                    } else if let Some(imm) = h.imm {
                        out.push(Completion::Arrival { link, imm, len: 0 });
                        return Pass::Landed;
                    }
                }
                At::Header => {
                    // Part of a header at most: move it to the front and
                    // read behind it.
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    let cap = self.cap();
                    match stream.read(&mut self.buf[self.end..cap]) {
                        Ok(0) if self.end == 0 => {
                            return down(format!("connection to {peer} closed"))
                        }
                        Ok(0) => {
                            return down(format!(
                                "connection to {peer} closed inside a frame header"
                            ))
                        }
                        Ok(k) => self.end += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pass::Idle,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return down(format!("connection to {peer}: {e}")),
                    }
                }
                At::Body { h, got } => {
                    // Checked against this region when the header came in.
                    let Some(r) = regions.target(h.region) else {
                        return down(format!("{peer}: region {} vanished", h.region));
                    };
                    let want = u64::from(h.len) - got;
                    let staged = (self.end - self.start) as u64;
                    let took = if staged > 0 {
                        let n = staged.min(want) as usize;
                        let bytes = &self.buf[self.start..self.start + n];
                        if let Err(e) = r.write_gather(h.offset + got, &[bytes]) {
                            return down(format!("{peer}: {e}"));
                        }
                        self.start += n;
                        self.copied += n as u64;
                        n as u64
                    } else {
                        // The rest of the body straight into the region;
                        // what follows it into the inbox.
                        let cap = self.cap();
                        let fd = stream.as_raw_fd();
                        match r.read_fd_spill(h.offset + got, want, fd, &mut self.buf[..cap]) {
                            Ok(0) => {
                                return down(format!("connection to {peer} closed mid-message"))
                            }
                            Ok(k) => {
                                let body = (k as u64).min(want);
                                self.start = 0;
                                self.end = k - body as usize;
                                body
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pass::Idle,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                return down(format!("connection to {peer} broke mid-message: {e}"))
                            }
                        }
                    };
                    let got = got + took;
                    if got < u64::from(h.len) {
                        self.at = At::Body { h, got };
                        continue;
                    }
                    self.at = At::Header;
                    if let Some(imm) = h.imm {
                        out.push(Completion::Arrival {
                            link,
                            imm,
                            len: h.len,
                        });
                        return Pass::Landed;
                    }
                }
            }
        }
    }
}
