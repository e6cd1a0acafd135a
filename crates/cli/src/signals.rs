//! SIGINT / SIGTERM as a flag: commands that write outputs check it between
//! items and stop with an honest manifest instead of dying mid-write.
//!
//! The handler only stores the signal number (async-signal-safe). A second
//! signal while the first is being handled ends the process at once with
//! `128 + signal`, so a stuck command can still be stopped.

use std::sync::atomic::{AtomicI32, Ordering};

static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if PENDING.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe and takes an int status.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the handler for SIGINT and SIGTERM (without `SA_RESTART`, so a
/// blocking read returns `EINTR` and the caller can look at the flag).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is a valid value (no flags, empty
        // mask, default handler) that the fields below then fill in.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        act.sa_flags = 0;
        // SAFETY: `act.sa_mask` is a valid, exclusively borrowed sigset_t.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: `act` is fully initialised and only read; the handler has
        // the C ABI and only touches an atomic (async-signal-safe).
        unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
    }
}

/// The signal received since [`install`], if any.
#[inline]
pub fn pending() -> Option<i32> {
    match PENDING.load(Ordering::Relaxed) {
        0 => None,
        s => Some(s),
    }
}
