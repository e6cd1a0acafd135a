//! A migration recorded as several connections, read as one: the main
//! connection and, after each postcopy pause, the recovery connection that
//! continues it (wire-format §11: it starts with RECV_BITMAP commands and
//! POSTCOPY_RESUME, not with a QEVM header), plus the postcopy-preempt
//! channels (§12: RAM page records only).
//!
//! Which file is what is said by the user, never guessed from the bytes:
//! the first main file must be a whole stream's start; every later main
//! file is read as the continuation of the one before it
//! ([`Decoder::continuation`], refused unless that one was cut
//! after POSTCOPY_RUN, as only then does QEMU pause); preempt channel
//! files (`--preempt-channel`) are read as preempt channels ([`Decoder::preempt_channel`]).
//!
//! Order of application: the k-th preempt channel belongs to the k-th main
//! connection. It is read when that main connection ends (at its cut), or,
//! for the last main connection, before its EOF byte. In postcopy the source
//! is stopped, so every page it sends holds the page's final content and
//! the order between channels does not change the result; a page sent twice
//! is refused by the destination state machine as QEMU refuses it.
//!
//! Offsets in messages are offsets in the named connection's file.
//!
//! How a file is opened (containers, stdin, seekable reading) is the
//! caller's: [`walk`] asks its `open` callback for a [`StreamReader`] per
//! connection, giving it the [`Decoder`] to read a recovery connection or a
//! preempt channel with. Used by the CLI (`qmig extract|inspect|roundtrip
//! MAIN1 MAIN2... --preempt-channel P...`) and the Python package.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::recovery::RecoveryChannel;
use crate::{Command, Decoder, Item, RamBody, ReadItem, StreamReader, WireError};

/// The connection files of one migration, in order.
pub struct Plan<'a> {
    /// Main connections: the first, then each recovery connection.
    pub mains: &'a [PathBuf],
    /// Preempt channels: the k-th belongs to the k-th main connection.
    pub preempt: &'a [PathBuf],
}

impl Plan<'_> {
    /// Checks the plan's shape: at least one main connection, and no more
    /// preempt channels than main connections (QEMU opens one preempt
    /// channel per main connection: `postcopy_preempt_setup`).
    ///
    /// # Errors
    /// A message naming the broken rule.
    pub fn check(&self) -> Result<(), String> {
        if self.mains.is_empty() {
            return Err("no main connection".into());
        }
        if self.preempt.len() > self.mains.len() {
            return Err(format!(
                "{} preempt channels for {} main connections: the k-th preempt channel belongs to the k-th main connection",
                self.preempt.len(),
                self.mains.len()
            ));
        }
        Ok(())
    }
}

/// What a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The first main connection (QEVM header).
    Main,
    /// A main connection continuing a paused postcopy migration.
    Recovery,
    /// A postcopy-preempt channel.
    Preempt,
}

impl Role {
    /// `main`, `recovery` or `preempt`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Recovery => "recovery",
            Role::Preempt => "preempt",
        }
    }
}

/// One connection being read.
#[derive(Debug, Clone)]
pub struct Conn {
    /// What it is.
    pub role: Role,
    /// 1-based among the main connections (main and recovery) or among the
    /// preempt channels.
    pub index: usize,
    /// Its file.
    pub path: PathBuf,
}

impl Conn {
    /// A short label: `main-1`, `main-2`, `preempt-1`...
    pub fn label(&self) -> String {
        match self.role {
            Role::Preempt => format!("preempt-{}", self.index),
            _ => format!("main-{}", self.index),
        }
    }
}

/// What the walk reports.
pub enum Event<'e, 'a> {
    /// An item of a connection. `recovery` is true for the RECV_BITMAP and
    /// POSTCOPY_RESUME commands of a recovery connection (already checked).
    Item {
        /// The connection.
        conn: &'e Conn,
        /// The item.
        ri: &'e ReadItem<'a>,
        /// A recovery handshake command.
        recovery: bool,
    },
    /// The connection ended inside an item (it was cut): `at` is the end
    /// of its last whole item, `end` the end of the file.
    Cut {
        /// The connection.
        conn: &'e Conn,
        /// Offset of the unfinished item.
        at: u64,
        /// Bytes in the file.
        end: u64,
    },
    /// The connection ended cleanly (EOF read, or a preempt channel closed
    /// between records) after `end` bytes.
    End {
        /// The connection.
        conn: &'e Conn,
        /// Bytes read.
        end: u64,
    },
}

/// Why a walk stopped.
#[derive(Debug)]
pub enum WalkError<O, E> {
    /// An input could not be opened (the `open` callback's error).
    Open(O),
    /// A connection does not read.
    Wire {
        /// The connection's file.
        file: String,
        /// The error (offset in that file).
        err: WireError,
    },
    /// The visitor stopped it.
    Visit(E),
}

/// The RAM layout announced so far (MEM_SIZE), for the recovery checks.
#[derive(Default)]
struct Layout {
    blocks: HashMap<String, u64>,
    page_size: u64,
}

impl Layout {
    fn pages(&self, name: &str) -> Option<u64> {
        self.blocks.get(name).map(|l| l / self.page_size.max(1))
    }
    fn learn(&mut self, ri: &ReadItem<'_>) {
        if let Item::Ram(r) = &ri.item {
            if let RamBody::MemSize(bl) = &r.body {
                for b in bl {
                    self.blocks.insert(b.name.to_string(), b.used_length);
                }
            }
        }
        self.page_size = ri.decoder.ram_context().page_size() as u64;
    }
}

fn wire<O, E>(path: &Path, err: WireError) -> WalkError<O, E> {
    WalkError::Wire {
        file: path.display().to_string(),
        err,
    }
}

/// Reads every connection of `plan` in order (see the module docs) and
/// hands each item, cut and end to `f`. Returns the layout's block page
/// counts (name → target pages) for the callers' own checks.
///
/// `open(conn, decoder)` gives the reader of a connection: for the first
/// main connection `decoder` is `None` (the caller makes the reader of a
/// whole stream, seekable or not); for the others it is the decoder to read
/// it with (`StreamReader::with_decoder(bytes, decoder)`).
///
/// The recovery handshake of each later main connection is checked
/// ([`RecoveryChannel`]: RECV_BITMAP of known blocks, then
/// POSTCOPY_RESUME), against the RAM layout its MEM_SIZE record announced.
///
/// # Errors
/// [`WalkError::Open`] from `open`, [`WalkError::Visit`] from `f`, and
/// [`WalkError::Wire`] when a connection does not read: a decoder error, a
/// cut main connection before QEMU could pause (not after POSTCOPY_RUN:
/// [`Decoder::continuation`]), a recovery handshake out of order, or a cut
/// in the last main connection or a preempt channel of an uncut one.
pub fn walk<R: Read, O, E>(
    plan: &Plan<'_>,
    mut open: impl FnMut(&Conn, Option<Decoder>) -> Result<StreamReader<R>, O>,
    mut f: impl FnMut(Event<'_, '_>) -> Result<(), E>,
) -> Result<BTreeMap<String, u64>, WalkError<O, E>> {
    let n = plan.mains.len();
    let mut layout = Layout::default();
    let mut prev: Option<(Decoder, PathBuf)> = None;
    let mut next_preempt = 0usize;
    for (k, path) in plan.mains.iter().enumerate() {
        let conn = Conn {
            role: if k == 0 { Role::Main } else { Role::Recovery },
            index: k + 1,
            path: path.clone(),
        };
        let mut rd: StreamReader<R> = match &prev {
            None => open(&conn, None).map_err(WalkError::Open)?,
            Some((d, ppath)) => {
                let dec = d.continuation().map_err(|e| wire(ppath, e))?;
                open(&conn, Some(dec)).map_err(WalkError::Open)?
            }
        };
        let mut order = (k > 0).then(RecoveryChannel::new);
        loop {
            match rd.next_item() {
                Ok(Some(ri)) => {
                    layout.learn(&ri);
                    let mut recovery = false;
                    if let Some(o) = order.as_mut() {
                        o.check(ri.offset, &ri.item, |b| layout.pages(b))
                            .map_err(|e| wire(path, e))?;
                        recovery = matches!(
                            ri.item,
                            Item::Command(Command::RecvBitmap { .. } | Command::PostcopyResume)
                        );
                    }
                    if k + 1 == n && matches!(ri.item, Item::Eof) {
                        let pd = ri.decoder.clone();
                        while next_preempt < plan.preempt.len() {
                            next_preempt += 1;
                            preempt(plan, next_preempt, &pd, false, &mut open, &mut f)?;
                        }
                    }
                    f(Event::Item {
                        conn: &conn,
                        ri: &ri,
                        recovery,
                    })
                    .map_err(WalkError::Visit)?;
                }
                Ok(None) => {
                    let end = rd.decoder().position();
                    f(Event::End { conn: &conn, end }).map_err(WalkError::Visit)?;
                    break;
                }
                Err(WireError::Truncated { offset, end, .. }) if k + 1 < n => {
                    f(Event::Cut {
                        conn: &conn,
                        at: offset,
                        end,
                    })
                    .map_err(WalkError::Visit)?;
                    let d = rd.decoder().clone();
                    if next_preempt < plan.preempt.len() && next_preempt == k {
                        next_preempt += 1;
                        preempt(plan, next_preempt, &d, true, &mut open, &mut f)?;
                    }
                    prev = Some((d, path.clone()));
                    break;
                }
                Err(e) => return Err(wire(path, e)),
            }
        }
    }
    Ok(layout
        .blocks
        .iter()
        .map(|(b, l)| (b.clone(), l / layout.page_size.max(1)))
        .collect())
}

/// Reads preempt channel `index` (1-based) with the context of `main`;
/// `may_be_cut`: its main connection was cut, so it may end inside a record.
fn preempt<R: Read, O, E>(
    plan: &Plan<'_>,
    index: usize,
    main: &Decoder,
    may_be_cut: bool,
    open: &mut impl FnMut(&Conn, Option<Decoder>) -> Result<StreamReader<R>, O>,
    f: &mut impl FnMut(Event<'_, '_>) -> Result<(), E>,
) -> Result<(), WalkError<O, E>> {
    let path = &plan.preempt[index - 1];
    let conn = Conn {
        role: Role::Preempt,
        index,
        path: path.clone(),
    };
    let mut rd = open(&conn, Some(main.preempt_channel())).map_err(WalkError::Open)?;
    loop {
        match rd.next_item() {
            Ok(Some(ri)) => f(Event::Item {
                conn: &conn,
                ri: &ri,
                recovery: false,
            })
            .map_err(WalkError::Visit)?,
            Ok(None) => {
                let end = rd.decoder().position();
                return f(Event::End { conn: &conn, end }).map_err(WalkError::Visit);
            }
            Err(WireError::Truncated { offset, end, .. }) if may_be_cut => {
                return f(Event::Cut {
                    conn: &conn,
                    at: offset,
                    end,
                })
                .map_err(WalkError::Visit)
            }
            Err(e) => return Err(wire(path, e)),
        }
    }
}
