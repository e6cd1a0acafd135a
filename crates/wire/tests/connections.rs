//! `connections::walk` over the real QEMU 10 captures of recovered postcopy
//! migrations (tests/data/recovery): every connection is read in order, the
//! first main connections end at a cut, the recovery handshakes are flagged,
//! preempt channels are read with their main connection's context; wrong
//! plans give typed errors naming the file.

use std::io::Cursor;
use std::path::PathBuf;

use qmig_wire::connections::{walk, Conn, Event, Plan, Role, WalkError};
use qmig_wire::{Command, Decoder, Item, Limits, StreamReader};

fn dir(name: &str) -> PathBuf {
    qmig_tests::data_dir().join("recovery").join(name)
}

/// Opens a gzip'd connection file in memory.
fn open(conn: &Conn, dec: Option<Decoder>) -> Result<StreamReader<Cursor<Vec<u8>>>, String> {
    let raw = std::fs::read(&conn.path).map_err(|e| e.to_string())?;
    let bytes = Cursor::new(qmig_tests::gunzip(&raw));
    Ok(StreamReader::with_decoder(
        bytes,
        dec.unwrap_or_else(|| Decoder::new(Limits::default())),
    ))
}

/// (label, items, recovery commands, cut, eof) per connection, in the order read.
type Summary = Vec<(String, u64, u64, bool, bool)>;

fn summarize(plan: &Plan<'_>) -> Result<Summary, WalkError<String, ()>> {
    let mut out: Summary = Vec::new();
    walk(plan, open, |ev| -> Result<(), ()> {
        let conn = match &ev {
            Event::Item { conn, .. } | Event::Cut { conn, .. } | Event::End { conn, .. } => *conn,
        };
        if out.last().map(|l| &l.0) != Some(&conn.label()) {
            out.push((conn.label(), 0, 0, false, false));
        }
        let s = out.last_mut().unwrap();
        match ev {
            Event::Item { ri, recovery, .. } => {
                s.1 += 1;
                if recovery {
                    assert_eq!(conn.role, Role::Recovery);
                    assert!(matches!(
                        ri.item,
                        Item::Command(Command::RecvBitmap { .. } | Command::PostcopyResume)
                    ));
                    s.2 += 1;
                }
                if matches!(ri.item, Item::Eof) {
                    s.4 = true;
                }
            }
            Event::Cut { at, end, .. } => {
                assert!(at <= end);
                s.3 = true;
            }
            Event::End { .. } => {}
        }
        Ok(())
    })
    .map(|_| out)
}

#[test]
fn every_recovered_migration_reads_connection_by_connection() {
    for (name, preempt) in [
        ("q10-postcopy-recover", false),
        ("q10-postcopy-relay-cut", false),
        ("q10-preempt-recover", true),
    ] {
        let d = dir(name);
        let mains = vec![d.join("main-1.bin.gz"), d.join("main-2.bin.gz")];
        let pre: Vec<PathBuf> = if preempt {
            vec![d.join("preempt-1.bin.gz"), d.join("preempt-2.bin.gz")]
        } else {
            vec![]
        };
        let plan = Plan {
            mains: &mains,
            preempt: &pre,
        };
        plan.check().unwrap();
        let s = summarize(&plan).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let labels: Vec<&str> = s.iter().map(|c| c.0.as_str()).collect();
        if preempt {
            // preempt-1 at main-1's cut; preempt-2 before main-2's EOF.
            assert_eq!(
                labels,
                ["main-1", "preempt-1", "main-2", "preempt-2", "main-2"]
            );
        } else {
            assert_eq!(labels, ["main-1", "main-2"]);
        }
        let main1 = &s[0];
        assert!(main1.3 && !main1.4, "{name}: main-1 is cut, without EOF");
        assert_eq!(main1.2, 0);
        let main2: Vec<_> = s.iter().filter(|c| c.0 == "main-2").collect();
        // RECV_BITMAP per block, then POSTCOPY_RESUME.
        assert!(main2.iter().map(|c| c.2).sum::<u64>() >= 2, "{name}");
        assert!(main2.iter().any(|c| c.4), "{name}: main-2 ends with EOF");
        assert!(s.iter().all(|c| c.1 > 0 || c.0.starts_with("preempt")));
    }
}

#[test]
fn wrong_plans_are_refused_naming_the_file() {
    let d = dir("q10-preempt-recover");
    let (m1, m2, p1) = (
        d.join("main-1.bin.gz"),
        d.join("main-2.bin.gz"),
        d.join("preempt-1.bin.gz"),
    );
    // A recovery connection is not a stream's start.
    let mains = [m2.clone(), m1.clone()];
    match summarize(&Plan {
        mains: &mains,
        preempt: &[],
    }) {
        Err(WalkError::Wire { file, err }) => {
            assert!(file.ends_with("main-2.bin.gz"));
            assert_eq!(err.offset(), 0);
        }
        _ => panic!("main-2 read as a first connection"),
    }
    // The first connection alone ends inside an item.
    let mains = [m1.clone()];
    assert!(matches!(
        summarize(&Plan {
            mains: &mains,
            preempt: &[]
        }),
        Err(WalkError::Wire {
            err: qmig_wire::WireError::Truncated { .. },
            ..
        })
    ));
    // A whole stream's start is not a recovery connection.
    let mains = [m1.clone(), m1.clone()];
    assert!(matches!(
        summarize(&Plan {
            mains: &mains,
            preempt: &[]
        }),
        Err(WalkError::Wire { .. })
    ));
    // More preempt channels than main connections.
    let mains = [m1, m2];
    let pre = [p1.clone(), p1.clone(), p1];
    assert!(Plan {
        mains: &mains,
        preempt: &pre
    }
    .check()
    .is_err());
    assert!(Plan {
        mains: &[],
        preempt: &[]
    }
    .check()
    .is_err());
    // An open error is the opener's.
    let mains = [d.join("no-such-file")];
    assert!(matches!(
        summarize(&Plan {
            mains: &mains,
            preempt: &[]
        }),
        Err(WalkError::Open(_))
    ));
}
