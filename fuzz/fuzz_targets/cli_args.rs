//! The CLI's own parsers of user text: migration URIs (`qmig send --to`,
//! `qmig recv --listen`) and sizes with suffixes (`--cache-size 64M`).
//! They must never panic; whatever parses must print back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/cli/src/size.rs"]
#[allow(dead_code)]
mod size;
#[path = "../../crates/cli/src/uri.rs"]
#[allow(dead_code)]
mod uri;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = uri::MigUri::parse(s) {
        assert_eq!(uri::MigUri::parse(&u.to_string()), Ok(u));
    }
    if let Ok(n) = size::parse_size(s) {
        assert_eq!(size::parse_size(&n.to_string()), Ok(n));
    }
});
