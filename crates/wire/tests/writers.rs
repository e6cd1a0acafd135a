//! Writers are as strict as readers (issue 14 item 6): each serializer
//! refuses what a reader would refuse or misread, and writes nothing then.

use qmig_wire::{
    Command, ConfigBody, ConfigSubsection, Configuration, Discard, DiscardRange, Item, MemBlock,
    RamBody, RamRecord, RpMessage, SectionHeader, WireError,
};

fn refused(r: Result<(), WireError>, out: &[u8], at: usize, what: &str) {
    match r {
        Err(WireError::Unwritable { offset, .. }) => {
            assert_eq!(offset, at as u64, "{what}: offset");
            assert_eq!(out.len(), at, "{what}: nothing written");
        }
        other => panic!("{what}: expected Unwritable, got {other:?}"),
    }
}

#[test]
fn names_over_255_bytes_or_unprintable_are_refused() {
    let long = "x".repeat(256);
    let mut out = vec![9u8; 3];
    refused(
        RamRecord::zero(0, Some(&long)).write(&mut out),
        &out,
        3,
        "long block name",
    );
    refused(
        SectionHeader::start(1, "bad\nname", 0, 4).write(&mut out),
        &out,
        3,
        "idstr",
    );
    refused(
        Command::RecvBitmap { block: "" }.write(&mut out),
        &out,
        3,
        "empty name",
    );
    refused(
        RamRecord::mem_size(vec![MemBlock {
            name: &long,
            used_length: 4096,
            page_size: None,
            addr: None,
        }])
        .write(&mut out),
        &out,
        3,
        "MEM_SIZE name",
    );
    // 255 is fine.
    let ok = "y".repeat(255);
    RamRecord::zero(0, Some(&ok)).write(&mut out).unwrap();
}

#[test]
fn flags_must_agree_with_the_body() {
    let mut out = Vec::new();
    let mut r = RamRecord::zero(4096, Some("pc.ram"));
    r.body = RamBody::Eos;
    refused(r.write(&mut out), &out, 0, "ZERO flags, EOS body");
    let mut r = RamRecord::page(0, Some("pc.ram"), &[0; 4096]);
    r.flags |= 0x20; // CONTINUE with a block name
    refused(r.write(&mut out), &out, 0, "CONTINUE with a name");
    let mut r = RamRecord::eos();
    r.block = Some("pc.ram");
    refused(r.write(&mut out), &out, 0, "EOS with a name");
    let r = RamRecord::zero(4096 + 0x10, Some("pc.ram"));
    refused(r.write(&mut out), &out, 0, "offset over the flag bits");
    let mut r = RamRecord::mem_size(vec![MemBlock {
        name: "a",
        used_length: 4096,
        page_size: None,
        addr: None,
    }]);
    r.offset = 8192;
    refused(r.write(&mut out), &out, 0, "MEM_SIZE total");
    refused(
        RamRecord::page(0, Some("pc.ram"), &[0; 100]).write(&mut out),
        &out,
        0,
        "short page",
    );
    let big = vec![0u8; 70_000];
    refused(
        RamRecord::xbzrle(0, Some("pc.ram"), &big).write(&mut out),
        &out,
        0,
        "XBZRLE over be16",
    );
}

#[test]
fn lengths_must_fit_their_fields() {
    let mut out = Vec::new();
    // 5000 ranges: 80 kB, over the be16 command length (no silent `as u16`).
    let d = Discard {
        block: "pc.ram",
        ranges: vec![
            DiscardRange {
                start: 0,
                len: 4096
            };
            5000
        ],
    };
    refused(
        Command::RamDiscard(d).write(&mut out),
        &out,
        0,
        "discard payload",
    );
    let d = Discard {
        block: "pc.ram",
        ranges: vec![
            DiscardRange {
                start: 0,
                len: 4096
            };
            4000
        ],
    };
    Command::RamDiscard(d).write(&mut out).unwrap();
    let mut out = Vec::new();
    let p = vec![0u8; 600];
    refused(
        RpMessage::Unknown {
            msg_type: 99,
            payload: &p,
        }
        .write(&mut out),
        &out,
        0,
        "return-path payload over 512",
    );
    refused(
        RpMessage::RecvBitmap {
            block: "pc.ram",
            bitmap: &[0; 7],
        }
        .write(&mut out),
        &out,
        0,
        "bitmap not a multiple of 8",
    );
}

#[test]
fn unknown_items_that_would_read_back_as_known_ones_are_refused() {
    let mut out = Vec::new();
    refused(
        Command::Unknown {
            cmd: 2,
            payload: &[0, 0, 0, 1],
        }
        .write(&mut out),
        &out,
        0,
        "unknown command 2 (PING)",
    );
    refused(
        RpMessage::Unknown {
            msg_type: 2,
            payload: &[0, 0, 0, 1],
        }
        .write(&mut out),
        &out,
        0,
        "unknown message 2 (PONG)",
    );
    refused(
        Item::Header { version: 2 }.write(&mut out),
        &out,
        0,
        "header version 2",
    );
    let mut h = SectionHeader::part(3);
    h.ident = SectionHeader::start(3, "ram", 0, 4).ident;
    refused(h.write(&mut out), &out, 0, "PART with an ident");
    let c = Configuration {
        machine: "pc-q35-10.0",
        subsections: vec![ConfigSubsection {
            name: "configuration/capabilities",
            version: 1,
            body: ConfigBody::TargetPageBits(12),
        }],
    };
    refused(c.write(&mut out), &out, 0, "subsection name/body mismatch");
    let c = Configuration {
        machine: "pc-q35-10.0",
        subsections: vec![ConfigSubsection {
            name: "configuration/target-page-bits",
            version: 1,
            body: ConfigBody::TargetPageBits(30),
        }],
    };
    refused(c.write(&mut out), &out, 0, "page bits 30");
}
