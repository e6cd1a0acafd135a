//! Progress on stderr, only when stderr is a terminal and `--quiet` was not
//! given. Bars use `{wide_bar}`, so the line fits the terminal width;
//! inputs of unknown size (pipes, compressed captures, sockets) get a byte
//! counter instead of a bar.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressState, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress and no summary lines on stderr (errors still are).
pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

fn shown() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Progress over `total` bytes labelled `what`; with `total == 0` (size not
/// known), a byte counter. Hidden unless stderr is a terminal.
pub fn bytes(total: u64, what: &str) -> ProgressBar {
    if !shown() {
        return ProgressBar::hidden();
    }
    let pb = if total == 0 {
        let pb = ProgressBar::new_spinner();
        pb.set_style(style(
            "{spinner} {msg} {bytes} {binary_bytes_per_sec} [{elapsed}]",
        ));
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    } else {
        let pb = ProgressBar::new(total);
        pb.set_style(style(
            "{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        ));
        pb
    };
    pb.set_message(what.to_string());
    pb
}

/// Progress for reading an opened input: the byte bar of [`bytes`] when the
/// stream's size is known (`total` > 0); otherwise (pipes, compressed input),
/// when stderr is a terminal and `--quiet` was not given, a counter of the
/// stream offset reached and of the bytes consumed from the input
/// (`consumed`, before decompression).
pub fn input(total: u64, consumed: Arc<AtomicU64>, what: &str) -> ProgressBar {
    if total > 0 {
        return bytes(total, what);
    }
    if !shown() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} stream {bytes}, input {input} read {binary_bytes_per_sec} [{elapsed}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .with_key(
            "input",
            move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}", HumanBytes(consumed.load(Ordering::Relaxed)));
            },
        ),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb.set_message(what.to_string());
    pb
}
