//! The return path of `qmig send --postcopy`, read on the sending thread
//! itself: `poll(2)` on the socket and `recv(MSG_DONTWAIT)`, so a page
//! request wakes the thread that serves it directly instead of a reader
//! thread that would then have to wake it (one thread hop less on every
//! fault round trip; QEMU's `source_return_path_thread` is such a reader).
//!
//! [`RpPoll`] offers the two calls of an `mpsc::Receiver<RpEvent>` that the
//! postcopy loop uses, `try_recv` and `recv_timeout`. Syscalls per page
//! request are kept few (each costs on the fault round trip): a short read
//! means the socket was empty, so the `try_recv` right after it does not
//! read again, and `recv_timeout` goes straight to `ppoll` (which returns at
//! once when bytes are there).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use crate::send::RpEvent;

/// Reads whole return-path messages from a socket without blocking the
/// writes that share it (`MSG_DONTWAIT` per call, never `O_NONBLOCK`, which
/// the write side's descriptor would share).
pub(crate) struct RpPoll {
    fd: OwnedFd,
    st: RefCell<State>,
}

#[derive(Default)]
struct State {
    /// Bytes read and not yet a whole message.
    buf: Vec<u8>,
    /// Return-path offset of `buf[0]`.
    base: u64,
    /// Decoded events not yet taken.
    ready: VecDeque<RpEvent>,
    /// EOF or an error was queued: nothing more is read.
    closed: bool,
    /// The last read was short (the socket had nothing more): the next
    /// `try_recv` answers `Empty` without reading (once).
    drained: bool,
}

impl RpPoll {
    /// Reads the return path from `fd` (a `dup` of the stream socket).
    pub(crate) fn new(fd: OwnedFd) -> Self {
        RpPoll {
            fd,
            st: RefCell::new(State::default()),
        }
    }

    /// The next event if one is there now; `Disconnected` once the events
    /// after EOF or an error have been taken.
    pub(crate) fn try_recv(&self) -> Result<RpEvent, TryRecvError> {
        let mut st = self.st.borrow_mut();
        if st.ready.is_empty() && !st.closed {
            if std::mem::take(&mut st.drained) {
                return Err(TryRecvError::Empty);
            }
            self.fill(&mut st);
        }
        match st.ready.pop_front() {
            Some(ev) => Ok(ev),
            None if st.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next event, waiting at most `wait` for it (a signal ends the
    /// wait early with `Timeout`, so the caller gets to check it).
    pub(crate) fn recv_timeout(&self, wait: Duration) -> Result<RpEvent, RecvTimeoutError> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut st = self.st.borrow_mut();
                if let Some(ev) = st.ready.pop_front() {
                    return Ok(ev);
                }
                if st.closed {
                    return Err(RecvTimeoutError::Disconnected);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvTimeoutError::Timeout);
            }
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one initialised pollfd and a timespec, both owned by
            // this frame; no signal mask is passed.
            let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
            if r < 0 {
                // EINTR (a signal): let the caller look at it.
                return Err(RecvTimeoutError::Timeout);
            }
            if r > 0 {
                let mut st = self.st.borrow_mut();
                st.drained = false;
                self.fill(&mut st);
            }
        }
    }

    /// Reads what the socket has now and decodes every whole message.
    fn fill(&self, st: &mut State) {
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: reads at most `chunk.len()` bytes into `chunk`, owned
            // by this frame; MSG_DONTWAIT makes only this call non-blocking.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                let why = (!st.buf.is_empty()).then(|| {
                    format!(
                        "the return path ended inside a message at offset {}",
                        st.base
                    )
                });
                st.ready.push_back(RpEvent::Closed(why));
                st.closed = true;
                return;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        st.ready.push_back(RpEvent::Closed(Some(format!(
                            "reading the return path: {e}"
                        ))));
                        st.closed = true;
                        return;
                    }
                }
            }
            st.buf.extend_from_slice(&chunk[..n as usize]);
            loop {
                match qmig_wire::decode_rp_message(&st.buf, st.base) {
                    Ok(Some((_, used))) => {
                        let msg = st.buf.drain(..used).collect();
                        st.ready.push_back(RpEvent::Msg(st.base, msg));
                        st.base += used as u64;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Broken framing (e.g. a RECV_BITMAP reply with a
                        // wrong end marker) fails the migration; it is not a cut.
                        st.ready
                            .push_back(RpEvent::Bad(format!("return path: {e}")));
                        st.closed = true;
                        return;
                    }
                }
            }
            if (n as usize) < chunk.len() {
                st.drained = true;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn messages_split_across_reads_then_eof() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let rp = RpPoll::new(b.into());
        assert!(matches!(rp.try_recv(), Err(TryRecvError::Empty)));
        let mut bytes = Vec::new();
        qmig_wire::RpMessage::Pong(7).write(&mut bytes).unwrap();
        qmig_wire::RpMessage::Shut(0).write(&mut bytes).unwrap();
        let pong = bytes.len() / 2;
        a.write_all(&bytes[..3]).unwrap();
        assert!(matches!(
            rp.recv_timeout(Duration::from_millis(20)),
            Err(RecvTimeoutError::Timeout)
        ));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            a.write_all(&bytes[3..]).unwrap();
        });
        match rp.recv_timeout(Duration::from_secs(5)) {
            Ok(RpEvent::Msg(0, m)) => assert_eq!(m.len(), pong),
            _ => panic!("no PONG"),
        }
        t.join().unwrap();
        match rp.recv_timeout(Duration::from_secs(5)) {
            Ok(RpEvent::Msg(at, _)) => assert_eq!(at, pong as u64),
            _ => panic!("no SHUT"),
        }
        assert!(matches!(
            rp.recv_timeout(Duration::from_secs(5)),
            Ok(RpEvent::Closed(None))
        ));
        assert!(matches!(
            rp.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Disconnected)
        ));
    }

    #[test]
    fn a_short_read_skips_one_read_and_the_next_try_reads_again() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let rp = RpPoll::new(b.into());
        let mut pong = Vec::new();
        qmig_wire::RpMessage::Pong(1).write(&mut pong).unwrap();
        a.write_all(&pong).unwrap();
        assert!(matches!(rp.try_recv(), Ok(RpEvent::Msg(0, _))));
        a.write_all(&pong).unwrap();
        // The socket was empty after the short read: this one does not read.
        assert!(matches!(rp.try_recv(), Err(TryRecvError::Empty)));
        match rp.try_recv() {
            Ok(RpEvent::Msg(at, _)) => assert_eq!(at, pong.len() as u64),
            _ => panic!("the second PONG was not read"),
        }
    }

    #[test]
    fn eof_inside_a_message_is_an_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let rp = RpPoll::new(b.into());
        a.write_all(&[0, 3]).unwrap();
        drop(a);
        match rp.recv_timeout(Duration::from_secs(5)) {
            Ok(RpEvent::Closed(Some(why))) => assert!(why.contains("inside a message"), "{why}"),
            _ => panic!("no error"),
        }
    }
}
