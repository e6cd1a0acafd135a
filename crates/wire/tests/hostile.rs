//! Every rejection rule: hostile bytes give the right typed error at the
//! right offset, never a panic.

use qmig_wire::command::decode_command;
use qmig_wire::header::write_header;
use qmig_wire::ram::{decode_record, flags};
use qmig_wire::section::write_footer;
use qmig_wire::*;

/// Header + configuration + RAM START with one 1 MiB block + EOS + footer.
fn prelude() -> Vec<u8> {
    let mut s = Vec::new();
    write_header(&mut s);
    Configuration {
        machine: "pc",
        subsections: vec![],
    }
    .write(&mut s)
    .unwrap();
    SectionHeader::start(2, "ram", 0, 4).write(&mut s).unwrap();
    RamRecord::mem_size(vec![MemBlock {
        name: "pc.ram",
        used_length: 1 << 20,
        page_size: None,
        addr: None,
    }])
    .write(&mut s)
    .unwrap();
    RamRecord::eos().write(&mut s).unwrap();
    write_footer(&mut s, 2);
    s
}

fn first_error(s: &[u8]) -> WireError {
    SliceReader::new(s).find_map(Result::err).expect("an error")
}

#[test]
fn bad_magic_and_version() {
    let e = first_error(b"QEVX\0\0\0\x03");
    assert!(
        matches!(
            e,
            WireError::BadMagic {
                offset: 0,
                found: 0x5145_5658
            }
        ),
        "{e}"
    );
    let e = first_error(b"QEVM\0\0\0\x02");
    assert!(
        matches!(
            e,
            WireError::BadVersion {
                offset: 4,
                found: 2
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_section_type() {
    let mut s = prelude();
    let at = s.len() as u64;
    s.push(0x42);
    let e = first_error(&s);
    assert!(
        matches!(e, WireError::UnknownSectionType { byte: 0x42, offset } if offset == at),
        "{e}"
    );
}

#[test]
fn footer_mismatch() {
    let mut s = prelude();
    // Replace the footer id 2 by 3.
    let n = s.len();
    s[n - 1] = 3;
    let e = first_error(&s);
    assert!(
        matches!(e, WireError::FooterMismatch { expected: 2, found: 3, offset } if offset == n as u64 - 5),
        "{e}"
    );
}

#[test]
fn part_for_section_never_started() {
    let mut s = prelude();
    let at = s.len() as u64;
    SectionHeader::part(9).write(&mut s).unwrap();
    let e = first_error(&s);
    assert!(
        matches!(e, WireError::SectionNotStarted { section_id: 9, offset } if offset == at),
        "{e}"
    );
}

#[test]
fn continue_without_block() {
    let mut s = prelude();
    SectionHeader::part(2).write(&mut s).unwrap();
    let at = s.len() as u64;
    s.extend_from_slice(&(flags::ZERO | flags::CONTINUE).to_be_bytes());
    s.push(0);
    let e = first_error(&s);
    assert!(
        matches!(e, WireError::ContinueWithoutBlock { offset } if offset == at),
        "{e}"
    );
}

#[test]
fn block_name_empty_or_invalid() {
    let ctx = RamContext::default();
    let mut r = flags::PAGE.to_be_bytes().to_vec();
    r.push(0);
    let e = decode_record(&r, 100, &ctx, false).unwrap_err();
    assert!(matches!(e, WireError::BadName { offset: 108, .. }), "{e}");
    let mut r = flags::PAGE.to_be_bytes().to_vec();
    r.extend_from_slice(b"\x03a\x00b");
    let e = decode_record(&r, 0, &ctx, false).unwrap_err();
    assert!(matches!(e, WireError::BadName { offset: 8, .. }), "{e}");
}

#[test]
fn xbzrle_header_and_length() {
    let ctx = RamContext::default();
    let mut r = (flags::XBZRLE | flags::CONTINUE).to_be_bytes().to_vec();
    r.extend_from_slice(&[2, 0, 1, 0]);
    let e = decode_record(&r, 0, &ctx, true).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::XbzrleHeader {
                offset: 8,
                found: 2
            }
        ),
        "{e}"
    );
    let mut r = (flags::XBZRLE | flags::CONTINUE).to_be_bytes().to_vec();
    r.extend_from_slice(&[1, 0x10, 0x01]);
    let e = decode_record(&r, 0, &ctx, true).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::XbzrleLength {
                offset: 9,
                len: 4097,
                page_size: 4096
            }
        ),
        "{e}"
    );
}

#[test]
fn compress_length_above_bound() {
    let ctx = RamContext::default();
    let mut r = (flags::COMPRESS_PAGE | flags::CONTINUE)
        .to_be_bytes()
        .to_vec();
    r.extend_from_slice(&4111u32.to_be_bytes());
    let e = decode_record(&r, 0, &ctx, true).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::CompressLength {
                offset: 8,
                len: 4111,
                bound: 4110,
                ..
            }
        ),
        "{e}"
    );
    // Exactly the bound is allowed (truncated here, so a truncation error).
    let mut r = (flags::COMPRESS_PAGE | flags::CONTINUE)
        .to_be_bytes()
        .to_vec();
    r.extend_from_slice(&4110u32.to_be_bytes());
    assert!(decode_record(&r, 0, &ctx, true)
        .unwrap_err()
        .is_truncation());
}

#[test]
fn bad_flag_combinations() {
    let ctx = RamContext::default();
    for f in [
        0u64,
        flags::ZERO | flags::PAGE,
        flags::FULL,
        flags::EOS | flags::CONTINUE,
        0x400,
        flags::PAGE | flags::XBZRLE,
    ] {
        let r = f.to_be_bytes();
        let e = decode_record(&r, 0, &ctx, true).unwrap_err();
        assert!(
            matches!(e, WireError::BadRamFlags { offset: 0, .. }),
            "{f:#x}: {e}"
        );
    }
}

#[test]
fn packaged_cap_is_configurable() {
    let mut c = Vec::new();
    Command::Packaged { len: 1000 }.write(&mut c).unwrap();
    let e = decode_command(&c, 0, 999).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::TooLarge {
                len: 1000,
                cap: 999,
                offset: 5,
                ..
            }
        ),
        "{e}"
    );
    assert!(decode_command(&c, 0, 1000).is_ok());
    // Default cap: 256 MiB.
    let mut s = prelude();
    let at = s.len() as u64;
    Command::Packaged {
        len: (256 << 20) + 1,
    }
    .write(&mut s)
    .unwrap();
    let e = first_error(&s);
    assert!(
        matches!(e, WireError::TooLarge { offset, .. } if offset == at + 5),
        "{e}"
    );
}

#[test]
fn mem_size_overflow_and_mismatch() {
    let ctx = RamContext::default();
    // Two blocks whose lengths overflow u64.
    let mut r = (!0xfffu64 | flags::MEM_SIZE).to_be_bytes().to_vec();
    r.extend_from_slice(b"\x01a");
    r.extend_from_slice(&0xffff_ffff_ffff_0000u64.to_be_bytes());
    r.extend_from_slice(b"\x01b");
    r.extend_from_slice(&0x20000u64.to_be_bytes());
    let e = decode_record(&r, 0, &ctx, false).unwrap_err();
    assert!(matches!(e, WireError::MemSize { offset: 18, .. }), "{e}");
    // Lengths that exceed the total.
    let mut r = (0x1000 | flags::MEM_SIZE).to_be_bytes().to_vec();
    r.extend_from_slice(b"\x01a");
    r.extend_from_slice(&0x2000u64.to_be_bytes());
    let e = decode_record(&r, 0, &ctx, false).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::MemSize {
                offset: 8,
                total: 0x1000,
                sum: 0x2000,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn discard_not_multiple_of_16() {
    let mut c = Vec::new();
    Command::RamDiscard(Discard {
        block: "pc.ram",
        ranges: vec![DiscardRange {
            start: 0,
            len: 4096,
        }],
    })
    .write(&mut c)
    .unwrap();
    // Drop one byte of the range list and fix the length field.
    c.pop();
    let len = u16::from_be_bytes([c[3], c[4]]) - 1;
    c[3..5].copy_from_slice(&len.to_be_bytes());
    let e = decode_command(&c, 0, 1 << 20).unwrap_err();
    assert!(matches!(e, WireError::Discard { offset: 14, .. }), "{e}");
    // Missing terminating zero after the name.
    let mut c = Vec::new();
    Command::RamDiscard(Discard {
        block: "pc.ram",
        ranges: vec![],
    })
    .write(&mut c)
    .unwrap();
    let n = c.len();
    c[n - 1] = 7;
    let e = decode_command(&c, 0, 1 << 20).unwrap_err();
    assert!(matches!(e, WireError::Discard { .. }), "{e}");
}

#[test]
fn recv_bitmap_end_marker() {
    let mut m = Vec::new();
    RpMessage::RecvBitmap {
        block: "pc.ram",
        bitmap: &[0xff; 16],
    }
    .write(&mut m)
    .unwrap();
    let n = m.len();
    m[n - 1] ^= 1;
    let e = parse_return_path(&m).unwrap_err();
    assert!(
        matches!(e, WireError::BitmapEndMarker { offset, .. } if offset == n as u64 - 8),
        "{e}"
    );
    // Size not a multiple of 8 (built by hand: the writer refuses it).
    let mut m = vec![0, 5, 0, 7, 6];
    m.extend_from_slice(b"pc.ram");
    m.extend_from_slice(&5u64.to_be_bytes());
    m.extend_from_slice(&[0xff; 5]);
    m.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
    let e = parse_return_path(&m).unwrap_err();
    assert!(matches!(e, WireError::BitmapSize { size: 5, .. }), "{e}");
}

#[test]
fn return_path_fixed_lengths() {
    // PONG with 3 bytes.
    let m = [0, 2, 0, 3, 1, 2, 3];
    let e = parse_return_path(&m).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::ReturnPathLength {
                offset: 0,
                msg_type: 2,
                len: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn command_fixed_lengths() {
    // PING with 2 bytes.
    let c = [8, 0, 2, 0, 2, 0, 0];
    let e = decode_command(&c, 50, 1 << 20).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::CommandLength {
                offset: 50,
                cmd: 2,
                len: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn device_section_without_footer_is_reported() {
    let mut s = prelude();
    SectionHeader::full(5, "timer", 0, 2).write(&mut s).unwrap();
    let payload_at = s.len() as u64;
    s.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
    let e = first_error(&s);
    assert!(
        e.is_truncation() || matches!(e, WireError::DeviceSection { .. }),
        "{e}"
    );
    assert_eq!(e.offset(), payload_at);
}

#[test]
fn trailing_bytes_after_vmdesc() {
    let mut s = prelude();
    s.push(0);
    qmig_wire::vmdesc::write_vmdesc(&mut s, b"{}").unwrap();
    s.push(9);
    let e = first_error(&s);
    assert!(matches!(e, WireError::Structure { .. }), "{e}");
}

#[test]
fn packaged_nested_stream_is_delimited() {
    let mut s = prelude();
    let mut inner = Vec::new();
    Command::PostcopyListen.write(&mut inner).unwrap();
    SectionHeader::full(7, "timer", 0, 2)
        .write(&mut inner)
        .unwrap();
    // Payload containing a footer-like pattern for another id, and one for
    // this id that is not followed by a plausible item.
    inner.extend_from_slice(&[0x7e, 0, 0, 0, 8, 0x7e, 0, 0, 0, 7, 0x99, 1, 2]);
    write_footer(&mut inner, 7);
    Command::Ping(3).write(&mut inner).unwrap();
    Command::PostcopyRun.write(&mut inner).unwrap();
    Command::Packaged {
        len: inner.len() as u32,
    }
    .write(&mut s)
    .unwrap();
    s.extend_from_slice(&inner);
    Command::Ping(4).write(&mut s).unwrap();
    SectionHeader::end(2).write(&mut s).unwrap();
    RamRecord::eos().write(&mut s).unwrap();
    write_footer(&mut s, 2);
    s.push(0);
    let items: Vec<_> = SliceReader::new(&s).collect::<Result<_, _>>().unwrap();
    let kinds: Vec<&str> = items.iter().map(|(_, i)| i.kind_name()).collect();
    assert!(
        kinds
            .windows(3)
            .any(|w| w == ["FULL", "DEVICE_DATA", "FOOTER"]),
        "{kinds:?}"
    );
    let dev = items.iter().find_map(|(_, i)| {
        if let Item::DeviceData(d) = i {
            Some(d.len())
        } else {
            None
        }
    });
    assert_eq!(dev, Some(13));
    assert!(kinds.contains(&"PACKAGE_END"));
    let mut again = Vec::new();
    for (_, i) in &items {
        i.write(&mut again).unwrap();
    }
    assert_eq!(again, s);
}

#[test]
fn item_crossing_package_end_is_rejected() {
    let mut s = prelude();
    let mut inner = Vec::new();
    Command::Ping(3).write(&mut inner).unwrap();
    Command::Packaged {
        len: inner.len() as u32 - 1,
    }
    .write(&mut s)
    .unwrap();
    s.extend_from_slice(&inner);
    let e = first_error(&s);
    assert!(e.is_truncation(), "{e}");
}

/// With a vmdesc, no section is ever cut at footer-like bytes: an iterative
/// section of a format qmig does not know (here `dirty-bitmap`) is refused
/// rather than delimited by a scan its own data could steer; the same
/// bytes without a vmdesc go through the guarded scan.
#[test]
fn unknown_iterative_section_with_vmdesc_is_refused() {
    let mut s = prelude();
    SectionHeader::start(3, "dirty-bitmap", 0, 1)
        .write(&mut s)
        .unwrap();
    s.extend_from_slice(&[0x7e, 0, 0, 0, 3, 0, 0, 0, 0]);
    write_footer(&mut s, 3);
    SectionHeader::end(2).write(&mut s).unwrap();
    RamRecord::eos().write(&mut s).unwrap();
    write_footer(&mut s, 2);
    s.push(0);
    let mut with = s.clone();
    qmig_wire::vmdesc::write_vmdesc(&mut with, br#"{"page_size":4096,"devices":[]}"#).unwrap();
    match first_error(&with) {
        WireError::DeviceSection { idstr, why, .. } => {
            assert_eq!(idstr, "dirty-bitmap");
            assert!(why.contains("iterative"), "{why}");
        }
        e => panic!("{e}"),
    }
    // Without a vmdesc the footer scan applies: the fake footer inside the
    // payload is not followed by anything QEMU could send, so the payload
    // is read whole.
    let items = SliceReader::new(&s).collect::<Result<Vec<_>, _>>().unwrap();
    let payloads: Vec<&[u8]> = items
        .iter()
        .filter_map(|(_, it)| match it {
            Item::DeviceData(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(payloads, vec![&[0x7e, 0, 0, 0, 3, 0, 0, 0, 0][..]]);
}
