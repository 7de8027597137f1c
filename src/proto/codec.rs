//! Little-endian field encoding with every read bounds-checked.

/// Why bytes did not decode. The text names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

impl DecodeError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        DecodeError(msg.into())
    }
}

/// Longest string a message may carry.
pub const MAX_STR: usize = 4096;
/// Most elements in a list a message may carry.
pub const MAX_LIST: usize = 65_536;
/// Most bytes of one opaque blob (an endpoint).
pub const MAX_BLOB: usize = 16_384;

/// Appends fields to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Writer::default()
    }
    /// The bytes written so far.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A length-prefixed UTF-8 string (truncated to [`MAX_STR`] bytes at a
    /// character boundary so that it always decodes).
    pub fn str(&mut self, s: &str) {
        let mut end = s.len().min(MAX_STR);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u32(end as u32);
        self.buf.extend_from_slice(&s.as_bytes()[..end]);
    }
    /// Fixed-size bytes, no length prefix (a nonce, a MAC).
    pub fn array(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// A length-prefixed byte string (an opaque blob; at most
    /// [`MAX_BLOB`] bytes are written so that it always decodes).
    pub fn bytes(&mut self, b: &[u8]) {
        let b = &b[..b.len().min(MAX_BLOB)];
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }
}

/// Reads fields from a byte slice; every read checks the remaining length.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                DecodeError::new(format!(
                    "truncated: {what} needs {n} bytes at offset {}, {} left",
                    self.pos,
                    self.buf.len() - self.pos
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// One byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    /// A little-endian u16.
    pub fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    /// A little-endian u32.
    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A little-endian u64.
    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self, what: &str) -> Result<String, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > MAX_STR {
            return Err(DecodeError::new(format!(
                "{what}: string of {n} bytes exceeds {MAX_STR}"
            )));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::new(format!("{what}: not UTF-8")))
    }
    /// `N` bytes, no length prefix.
    pub fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    /// A length-prefixed byte string of at most [`MAX_BLOB`] bytes.
    pub fn bytes(&mut self, what: &str) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > MAX_BLOB {
            return Err(DecodeError::new(format!(
                "{what}: {n} bytes exceeds {MAX_BLOB}"
            )));
        }
        Ok(self.take(n, what)?.to_vec())
    }
    /// A list length, checked against [`MAX_LIST`].
    pub fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > MAX_LIST {
            return Err(DecodeError::new(format!(
                "{what}: {n} elements exceeds {MAX_LIST}"
            )));
        }
        Ok(n)
    }
    /// Fails unless every byte was consumed.
    pub fn end(&self, what: &str) -> Result<(), DecodeError> {
        if self.pos != self.buf.len() {
            return Err(DecodeError::new(format!(
                "{what}: {} trailing bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_fields() {
        let mut w = Writer::new();
        w.u8(7);
        w.u16(0xbeef);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 3);
        w.str("héllo");
        w.array(&[9; 3]);
        let b = w.finish();
        let mut r = Reader::new(&b);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0xbeef);
        assert_eq!(r.u32("c").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("d").unwrap(), u64::MAX - 3);
        assert_eq!(r.str("e").unwrap(), "héllo");
        assert_eq!(r.array::<3>("f").unwrap(), [9; 3]);
        r.end("msg").unwrap();
    }

    #[test]
    fn truncation_names_the_field() {
        let mut r = Reader::new(&[1, 2]);
        let e = r.u32("sequence").unwrap_err();
        assert!(e.0.contains("sequence"), "{e}");
    }

    #[test]
    fn long_strings_truncate_on_char_boundary() {
        let s = "é".repeat(MAX_STR);
        let mut w = Writer::new();
        w.str(&s);
        let b = w.finish();
        let got = Reader::new(&b).str("s").unwrap();
        assert!(got.len() <= MAX_STR && s.starts_with(&got));
    }
}
