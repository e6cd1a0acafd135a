//! The incremental reader holds bounded memory however long the stream:
//! a generated 256 MiB stream (never held in memory) is read with a buffer
//! that never grows past one read chunk plus one item.

use qmig_wire::header::write_header;
use qmig_wire::section::write_footer;
use qmig_wire::*;

/// Generates header + RAM START + `parts` PART sections of 256 pages + END + EOF.
struct Gen {
    parts: usize,
    done: usize,
    buf: Vec<u8>,
    pos: usize,
}

impl Gen {
    fn refill(&mut self) {
        self.buf.clear();
        self.pos = 0;
        let blocks = 1u64 << 30;
        if self.done == 0 {
            write_header(&mut self.buf);
            Configuration {
                machine: "pc",
                subsections: vec![],
            }
            .write(&mut self.buf)
            .unwrap();
            SectionHeader::start(1, "ram", 0, 4)
                .write(&mut self.buf)
                .unwrap();
            RamRecord::mem_size(vec![MemBlock {
                name: "pc.ram",
                used_length: blocks,
                page_size: None,
                addr: None,
            }])
            .write(&mut self.buf)
            .unwrap();
            RamRecord::eos().write(&mut self.buf).unwrap();
            write_footer(&mut self.buf, 1);
        }
        if self.done < self.parts {
            SectionHeader::part(1).write(&mut self.buf).unwrap();
            let page = vec![(self.done % 251) as u8 | 1; 4096];
            for i in 0..256u64 {
                let off = ((self.done as u64 * 256 + i) << 12) % blocks;
                RamRecord::page(off, (i == 0 && self.done == 0).then_some("pc.ram"), &page)
                    .write(&mut self.buf)
                    .unwrap();
            }
            RamRecord::eos().write(&mut self.buf).unwrap();
            write_footer(&mut self.buf, 1);
        } else if self.done == self.parts {
            SectionHeader::end(1).write(&mut self.buf).unwrap();
            RamRecord::eos().write(&mut self.buf).unwrap();
            write_footer(&mut self.buf, 1);
            self.buf.push(0);
        }
        self.done += 1;
    }
}

impl std::io::Read for Gen {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.done > self.parts {
                return Ok(0);
            }
            self.refill();
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn reader_memory_is_bounded_on_a_long_stream() {
    let parts = 256; // 256 × 256 pages × 4 KiB = 256 MiB
    let mut r = StreamReader::new(Gen {
        parts,
        done: 0,
        buf: Vec::new(),
        pos: 0,
    });
    let mut pages = 0u64;
    let mut max_cap = 0;
    while let Some(ri) = r.next_item().unwrap() {
        if let Item::Ram(RamRecord {
            body: RamBody::Page(_),
            ..
        }) = ri.item
        {
            pages += 1;
        }
        max_cap = max_cap.max(r.buffer_capacity());
    }
    assert_eq!(pages, parts as u64 * 256);
    assert!(r.decoder().is_done());
    assert!(
        max_cap <= 2 * qmig_wire::reader::DEFAULT_READ_CHUNK,
        "buffer grew to {max_cap} bytes"
    );
}
