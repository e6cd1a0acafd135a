//! Progress on stderr, only when stderr is a terminal and `--quiet` was not
//! given. Bars use `{wide_bar}`, so the line fits the terminal width;
//! inputs of unknown size (pipes, compressed captures, sockets) get a byte
//! counter instead of a bar.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

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
