//! Commands (section type 0x08): `u8 0x08, be16 cmd, be16 len, payload`.
//!
//! `PACKAGED` is special: its 4-byte payload gives the length of a nested
//! stream that follows the command.

use crate::error::{fail, PResult};
use crate::names::{check_name, put_counted};
use nom::bytes::streaming::take;
use nom::number::streaming::{be_u16, be_u64, be_u8};

/// Command numbers.
pub mod cmd {
    /// Destination should open the return path.
    pub const OPEN_RETURN_PATH: u16 = 1;
    /// Ask for a PONG with the same value.
    pub const PING: u16 = 2;
    /// Postcopy may happen; carries page size summary.
    pub const POSTCOPY_ADVISE: u16 = 3;
    /// Destination starts listening for postcopy pages.
    pub const POSTCOPY_LISTEN: u16 = 4;
    /// Destination starts running the guest.
    pub const POSTCOPY_RUN: u16 = 5;
    /// Discard ranges of a RAM block before postcopy.
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    /// A nested stream follows.
    pub const PACKAGED: u16 = 7;
    /// COLO mode.
    pub const ENABLE_COLO: u16 = 8;
    /// Postcopy recovery: resume.
    pub const POSTCOPY_RESUME: u16 = 9;
    /// Postcopy recovery: request a block's received bitmap.
    pub const RECV_BITMAP: u16 = 10;
    /// Source is about to switch over (QEMU >= 10 machine types).
    pub const SWITCHOVER_START: u16 = 11;
}

/// Highest valid `RAM_DISCARD` version byte.
pub const DISCARD_VERSION: u8 = 0;
/// Default cap on a `PACKAGED` length (QEMU's own cap is effectively 4 GiB).
pub const DEFAULT_MAX_PACKAGED: u32 = 256 << 20;

/// Name of a command number.
pub fn command_name(c: u16) -> &'static str {
    match c {
        cmd::OPEN_RETURN_PATH => "OPEN_RETURN_PATH",
        cmd::PING => "PING",
        cmd::POSTCOPY_ADVISE => "POSTCOPY_ADVISE",
        cmd::POSTCOPY_LISTEN => "POSTCOPY_LISTEN",
        cmd::POSTCOPY_RUN => "POSTCOPY_RUN",
        cmd::POSTCOPY_RAM_DISCARD => "POSTCOPY_RAM_DISCARD",
        cmd::PACKAGED => "PACKAGED",
        cmd::ENABLE_COLO => "ENABLE_COLO",
        cmd::POSTCOPY_RESUME => "POSTCOPY_RESUME",
        cmd::RECV_BITMAP => "RECV_BITMAP",
        cmd::SWITCHOVER_START => "SWITCHOVER_START",
        _ => "UNKNOWN",
    }
}

/// One discard range, in bytes from the start of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardRange {
    /// Start offset in the block.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// POSTCOPY_RAM_DISCARD payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discard<'a> {
    /// RAM block name.
    pub block: &'a str,
    /// Ranges to discard.
    pub ranges: Vec<DiscardRange>,
}

/// POSTCOPY_ADVISE payload (absent in the 0-length form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advise {
    /// Bitwise OR of the page sizes of all RAM blocks.
    pub page_size_summary: u64,
    /// The source's target page size.
    pub target_page_size: u64,
}

/// A decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// OPEN_RETURN_PATH.
    OpenReturnPath,
    /// PING with its value.
    Ping(u32),
    /// POSTCOPY_ADVISE; `None` for the 0-length form.
    PostcopyAdvise(Option<Advise>),
    /// POSTCOPY_LISTEN.
    PostcopyListen,
    /// POSTCOPY_RUN.
    PostcopyRun,
    /// POSTCOPY_RAM_DISCARD.
    RamDiscard(Discard<'a>),
    /// PACKAGED: `len` bytes of nested stream follow.
    Packaged {
        /// Length of the nested stream.
        len: u32,
    },
    /// ENABLE_COLO.
    EnableColo,
    /// POSTCOPY_RESUME.
    PostcopyResume,
    /// RECV_BITMAP for a block.
    RecvBitmap {
        /// Block whose bitmap is requested.
        block: &'a str,
    },
    /// SWITCHOVER_START.
    SwitchoverStart,
    /// A command number this crate does not know, kept verbatim.
    Unknown {
        /// Command number.
        cmd: u16,
        /// Raw payload.
        payload: &'a [u8],
    },
}

impl Command<'_> {
    /// The command number.
    pub fn number(&self) -> u16 {
        match self {
            Command::OpenReturnPath => cmd::OPEN_RETURN_PATH,
            Command::Ping(_) => cmd::PING,
            Command::PostcopyAdvise(_) => cmd::POSTCOPY_ADVISE,
            Command::PostcopyListen => cmd::POSTCOPY_LISTEN,
            Command::PostcopyRun => cmd::POSTCOPY_RUN,
            Command::RamDiscard(_) => cmd::POSTCOPY_RAM_DISCARD,
            Command::Packaged { .. } => cmd::PACKAGED,
            Command::EnableColo => cmd::ENABLE_COLO,
            Command::PostcopyResume => cmd::POSTCOPY_RESUME,
            Command::RecvBitmap { .. } => cmd::RECV_BITMAP,
            Command::SwitchoverStart => cmd::SWITCHOVER_START,
            Command::Unknown { cmd, .. } => *cmd,
        }
    }

    /// The command's name.
    pub fn name(&self) -> &'static str {
        command_name(self.number())
    }

    /// Serializes the command (type byte 0x08 included; for PACKAGED only the
    /// command itself, the nested stream is written by the caller).
    ///
    /// # Errors
    /// [`crate::WireError::Unwritable`] (nothing is written) for a payload
    /// over the be16 length (a discard of more than about 4000 ranges), a
    /// block name a reader would refuse, or an `Unknown` command whose number
    /// is a known command (it would be read back as that command).
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), crate::WireError> {
        let start = out.len();
        let bad = |why: String| crate::names::unwritable(start, "command", why);
        let mut payload = Vec::new();
        match self {
            Command::OpenReturnPath
            | Command::PostcopyListen
            | Command::PostcopyRun
            | Command::EnableColo
            | Command::PostcopyResume
            | Command::SwitchoverStart
            | Command::PostcopyAdvise(None) => {}
            Command::Ping(v) => payload.extend_from_slice(&v.to_be_bytes()),
            Command::PostcopyAdvise(Some(a)) => {
                payload.extend_from_slice(&a.page_size_summary.to_be_bytes());
                payload.extend_from_slice(&a.target_page_size.to_be_bytes());
            }
            Command::RamDiscard(d) => {
                payload.push(DISCARD_VERSION);
                put_counted(&mut payload, d.block, "RAM_DISCARD block name", start)?;
                payload.push(0);
                for r in &d.ranges {
                    payload.extend_from_slice(&r.start.to_be_bytes());
                    payload.extend_from_slice(&r.len.to_be_bytes());
                }
            }
            Command::Packaged { len } => payload.extend_from_slice(&len.to_be_bytes()),
            Command::RecvBitmap { block } => {
                put_counted(&mut payload, block, "RECV_BITMAP block name", start)?
            }
            Command::Unknown { cmd, payload: p } => {
                if command_name(*cmd) != "UNKNOWN" {
                    return Err(bad(format!(
                        "an unknown command numbered {cmd} would be read back as {}",
                        command_name(*cmd)
                    )));
                }
                payload.extend_from_slice(p)
            }
        }
        let Ok(len) = u16::try_from(payload.len()) else {
            return Err(bad(format!(
                "{} payload of {} bytes does not fit the be16 length",
                self.name(),
                payload.len()
            )));
        };
        out.push(crate::section::COMMAND);
        out.extend_from_slice(&self.number().to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&payload);
        Ok(())
    }
}

/// Fixed payload length of a known command, `None` when variable.
pub(crate) fn fixed_len(c: u16) -> Option<u16> {
    match c {
        cmd::OPEN_RETURN_PATH
        | cmd::POSTCOPY_LISTEN
        | cmd::POSTCOPY_RUN
        | cmd::ENABLE_COLO
        | cmd::POSTCOPY_RESUME
        | cmd::SWITCHOVER_START => Some(0),
        cmd::PING | cmd::PACKAGED => Some(4),
        _ => None,
    }
}

/// Whether a (cmd, len) pair is something a QEMU source could send; used to
/// recognise the start of a command when delimiting device sections.
pub(crate) fn plausible(c: u16, len: u16) -> bool {
    match c {
        cmd::POSTCOPY_ADVISE => len == 0 || len == 16,
        cmd::POSTCOPY_RAM_DISCARD => len >= 4 && (len - 4) % 16 != 1,
        cmd::RECV_BITMAP => len >= 2,
        _ => fixed_len(c) == Some(len),
    }
}

/// Parses a command, type byte included. `max_packaged` caps PACKAGED.
pub(crate) fn parse_command(i: &[u8], max_packaged: u32) -> PResult<'_, Command<'_>> {
    let at = i;
    let (i, _) = be_u8(i)?;
    let (i, c) = be_u16(i)?;
    let (i, len) = be_u16(i)?;
    let name = command_name(c);
    if let Some(fl) = fixed_len(c) {
        if len != fl {
            fail!(
                at,
                CommandLength {
                    cmd: c,
                    name: name,
                    len: len,
                    why: "which differs from the fixed length of this command"
                }
            );
        }
    }
    let (rest, p) = take(len as usize)(i)?;
    let command = match c {
        cmd::OPEN_RETURN_PATH => Command::OpenReturnPath,
        cmd::PING => Command::Ping(u32::from_be_bytes([p[0], p[1], p[2], p[3]])),
        cmd::POSTCOPY_ADVISE => match len {
            0 => Command::PostcopyAdvise(None),
            16 => {
                let (p, summary) = be_u64(p)?;
                let (_, tps) = be_u64(p)?;
                Command::PostcopyAdvise(Some(Advise {
                    page_size_summary: summary,
                    target_page_size: tps,
                }))
            }
            _ => fail!(
                at,
                CommandLength {
                    cmd: c,
                    name: name,
                    len: len,
                    why: "but ADVISE must be 0 or 16 bytes"
                }
            ),
        },
        cmd::POSTCOPY_LISTEN => Command::PostcopyListen,
        cmd::POSTCOPY_RUN => Command::PostcopyRun,
        cmd::POSTCOPY_RAM_DISCARD => Command::RamDiscard(parse_discard(i, p)?),
        cmd::PACKAGED => {
            let n = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
            if n > max_packaged {
                fail!(
                    i,
                    TooLarge {
                        what: "PACKAGED nested stream",
                        len: n as u64,
                        cap: max_packaged as u64
                    }
                );
            }
            Command::Packaged { len: n }
        }
        cmd::ENABLE_COLO => Command::EnableColo,
        cmd::POSTCOPY_RESUME => Command::PostcopyResume,
        cmd::RECV_BITMAP => {
            let block = payload_name(i, p, "RECV_BITMAP block name")?;
            if p.len() != 1 + block.len() {
                fail!(
                    at,
                    CommandLength {
                        cmd: c,
                        name: name,
                        len: len,
                        why: "but must be 1 + the block name length"
                    }
                );
            }
            Command::RecvBitmap { block }
        }
        cmd::SWITCHOVER_START => Command::SwitchoverStart,
        _ => Command::Unknown { cmd: c, payload: p },
    };
    Ok((rest, command))
}

/// A counted name at the start of a complete payload `p` (which starts at `at`).
fn payload_name<'a>(
    at: &'a [u8],
    p: &'a [u8],
    what: &'static str,
) -> Result<&'a str, nom::Err<crate::error::PErr>> {
    let n = match p.first() {
        Some(&n) => n as usize,
        None => fail!(
            at,
            BadName {
                what: what,
                why: "missing"
            }
        ),
    };
    if n == 0 {
        fail!(
            at,
            BadName {
                what: what,
                why: "length is 0"
            }
        );
    }
    if p.len() < 1 + n {
        fail!(
            at,
            BadName {
                what: what,
                why: "runs past the end of the command payload"
            }
        );
    }
    match check_name(&p[1..1 + n]) {
        Ok(s) => Ok(s),
        Err(why) => fail!(
            at,
            BadName {
                what: what,
                why: why
            }
        ),
    }
}

/// Parses the RAM_DISCARD payload `p` (complete, starting at `at`).
fn parse_discard<'a>(
    at: &'a [u8],
    p: &'a [u8],
) -> Result<Discard<'a>, nom::Err<crate::error::PErr>> {
    if p.len() < 3 {
        fail!(
            at,
            Discard {
                why: "payload shorter than version + name length + terminator"
            }
        );
    }
    if p[0] != DISCARD_VERSION {
        fail!(
            at,
            Discard {
                why: "unknown version byte (only 0 is defined)"
            }
        );
    }
    let block = payload_name(&at[1..], &p[1..], "RAM_DISCARD block name")?;
    let mut pos = 2 + block.len();
    match p.get(pos) {
        Some(0) => pos += 1,
        Some(_) => fail!(
            &at[pos..],
            Discard {
                why: "block name not followed by a 0 byte"
            }
        ),
        None => fail!(
            &at[pos..],
            Discard {
                why: "block name not followed by a 0 byte"
            }
        ),
    }
    let body = &p[pos..];
    if !body.len().is_multiple_of(16) {
        fail!(
            &at[pos..],
            Discard {
                why: "range list length is not a multiple of 16 bytes"
            }
        );
    }
    let ranges = body
        .chunks_exact(16)
        .map(|c| {
            let mut s = [0u8; 8];
            let mut l = [0u8; 8];
            s.copy_from_slice(&c[..8]);
            l.copy_from_slice(&c[8..]);
            DiscardRange {
                start: u64::from_be_bytes(s),
                len: u64::from_be_bytes(l),
            }
        })
        .collect();
    Ok(Discard { block, ranges })
}

/// Decodes one command (type byte 0x08 included) at the start of `buf`.
///
/// # Errors
/// [`crate::WireError`] with the absolute offset (`base` + position).
pub fn decode_command(
    buf: &[u8],
    base: u64,
    max_packaged: u32,
) -> Result<(Command<'_>, usize), crate::WireError> {
    crate::error::finish(buf, base, "command", parse_command(buf, max_packaged))
}
