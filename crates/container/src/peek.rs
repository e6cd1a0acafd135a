//! A reader whose first bytes can be looked at before they are read.

use std::io::{self, Read};

/// Wraps a reader so that a prefix can be examined ([`Peeked::fill`],
/// [`Peeked::peek`]) and is then replayed by [`Read::read`]: works on pipes,
/// which cannot seek back. Reads from the inner reader only as many bytes as
/// asked for by `fill`, so nothing past them is consumed.
#[derive(Debug)]
pub struct Peeked<R> {
    buf: Vec<u8>,
    pos: usize,
    inner: R,
    /// Bytes handed out by `read` so far.
    consumed: u64,
}

impl<R: Read> Peeked<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Peeked {
            buf: Vec::new(),
            pos: 0,
            inner,
            consumed: 0,
        }
    }

    /// Makes at least `n` unread bytes available to [`Peeked::peek`], or all
    /// there are if the input ends first.
    ///
    /// # Errors
    /// The inner reader's errors (other than `Interrupted`).
    pub fn fill(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        while self.buf.len() - self.pos < n {
            let have = self.buf.len();
            let want = n - (have - self.pos);
            self.buf.resize(have + want, 0);
            match self.inner.read(&mut self.buf[have..]) {
                Ok(k) => {
                    self.buf.truncate(have + k);
                    if k == 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.buf.truncate(have),
                Err(e) => {
                    self.buf.truncate(have);
                    return Err(e);
                }
            }
        }
        Ok(self.peek())
    }

    /// The unread bytes already buffered.
    pub fn peek(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Bytes handed out by `read` so far (the position in the input).
    pub fn position(&self) -> u64 {
        self.consumed
    }

    /// The buffered unread bytes and the inner reader.
    pub fn into_parts(self) -> (Vec<u8>, R) {
        (self.buf[self.pos..].to_vec(), self.inner)
    }
}

impl<R: Read> Read for Peeked<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = if self.pos < self.buf.len() {
            let n = out.len().min(self.buf.len() - self.pos);
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            n
        } else {
            self.inner.read(out)?
        };
        self.consumed += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reader that returns at most `step` bytes per call.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = out.len().min(self.1).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    proptest! {
        #[test]
        fn replays_exactly(data in proptest::collection::vec(any::<u8>(), 0..300), step in 1usize..20, n in 0usize..100, m in 0usize..100) {
            let mut p = Peeked::new(Trickle(&data, step));
            let got = p.fill(n).unwrap().to_vec();
            prop_assert_eq!(&got[..], &data[..n.min(data.len())]);
            let mut first = vec![0; m.min(data.len())];
            p.read_exact(&mut first).unwrap();
            prop_assert_eq!(&first[..], &data[..first.len()]);
            let again = p.fill(n).unwrap().to_vec();
            let from = first.len();
            prop_assert_eq!(&again[..], &data[from..(from + n).min(data.len())]);
            let mut rest = Vec::new();
            p.read_to_end(&mut rest).unwrap();
            prop_assert_eq!(&rest[..], &data[from..]);
            prop_assert_eq!(p.position(), data.len() as u64);
        }
    }
}
