//! A progress bar on stderr, shown only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use indicatif::{HumanBytes, ProgressBar, ProgressState, ProgressStyle};

/// Creates a byte progress bar of `total` bytes, hidden unless stderr is a terminal.
pub fn bytes(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() || total < (64 << 20) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Progress for reading an opened input: the byte bar of [`bytes`] when the
/// stream's size is known (`total` > 0); otherwise (pipes, compressed input),
/// when stderr is a terminal, a counter of the stream offset reached and of
/// the bytes consumed from the input (`consumed`, before decompression).
pub fn input(total: u64, consumed: Arc<AtomicU64>, what: &str) -> ProgressBar {
    if total > 0 {
        return bytes(total, what);
    }
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} {spinner} stream {bytes}, input {input} read {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .with_key(
            "input",
            move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}", HumanBytes(consumed.load(Ordering::Relaxed)));
            },
        ),
    );
    pb.set_message(what.to_string());
    pb
}
