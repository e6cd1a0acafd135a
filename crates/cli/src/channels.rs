//! `qmig inspect MAIN --multifd-channel FILE...`: a summary of recorded
//! multifd channel connections (channel header, packets, page counts),
//! read packet by packet with bounded memory.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use qmig_wire::multifd::{
    parse_packet, ChannelInit, Packet, PacketContext, INIT_LEN, MAX_COMPRESSED,
};
use serde_json::{json, Value};

/// What one channel file holds.
#[derive(Default)]
pub struct ChannelSummary {
    file: String,
    id: Option<u8>,
    uuid: Option<String>,
    ram_packets: u64,
    sync_packets: u64,
    device_state_packets: u64,
    device_state_bytes: u64,
    /// Pages whose content a packet carries (QEMU's `normal`).
    pub normal_pages: u64,
    /// Pages a packet lists as zero (QEMU's `duplicate` under
    /// `zero-page-detection=multifd`).
    pub zero_pages: u64,
    payload_bytes: u64,
    compression: BTreeSet<&'static str>,
    /// Per block: (normal, zero) pages.
    blocks: BTreeMap<String, (u64, u64)>,
    bytes: u64,
    /// The first error, if the channel did not read to its end.
    pub error: Option<String>,
}

/// Most block names kept per channel (the rest are counted together).
const KEEP_BLOCKS: usize = 1000;

/// Reads the channel recorded in `path` with target page size `page_size`.
pub fn summarize(path: &Path, page_size: u64) -> ChannelSummary {
    let mut s = ChannelSummary {
        file: path.display().to_string(),
        ..Default::default()
    };
    if let Err(e) = read(path, page_size, &mut s) {
        s.error = Some(e);
    }
    s
}

fn read(path: &Path, page_size: u64, s: &mut ChannelSummary) -> Result<(), String> {
    let mut input = crate::input::open(path)?.input;
    let ctx = PacketContext::new(page_size);
    // The largest packet: a device-state packet at its cap, or a RAM packet
    // with a compressed payload at its cap.
    let cap = (ctx.max_device_state as usize).max(MAX_COMPRESSED as usize) + (1 << 20);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut start = 0usize;
    let mut eof = false;
    let mut pos = 0u64;
    let mut fill = |buf: &mut Vec<u8>, start: &mut usize, eof: &mut bool| -> Result<(), String> {
        if *start > 0 {
            buf.drain(..*start);
            *start = 0;
        }
        if buf.len() >= cap {
            return Err(format!("a packet larger than {cap} bytes"));
        }
        let old = buf.len();
        buf.resize(old + (1 << 20), 0);
        let n = loop {
            match input.read(&mut buf[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        };
        buf.truncate(old + n);
        *eof = n == 0;
        Ok(())
    };
    while buf.len() < INIT_LEN && !eof {
        fill(&mut buf, &mut start, &mut eof)?;
    }
    let init = ChannelInit::parse(&buf, 0)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "offset 0: input ends inside the channel header".to_string())?;
    s.id = Some(init.id);
    s.uuid = Some(init.uuid.iter().map(|b| format!("{b:02x}")).collect());
    start = INIT_LEN;
    pos += INIT_LEN as u64;
    loop {
        match parse_packet(&buf[start..], pos, &ctx).map_err(|e| e.to_string())? {
            Some((p, n)) => {
                count(s, &p);
                start += n;
                pos += n as u64;
            }
            None if eof => {
                if start == buf.len() {
                    break;
                }
                return Err(format!(
                    "offset {pos}: input ends inside a packet ({} bytes left)",
                    buf.len() - start
                ));
            }
            None => fill(&mut buf, &mut start, &mut eof)?,
        }
    }
    s.bytes = pos;
    Ok(())
}

fn count(s: &mut ChannelSummary, p: &Packet<'_>) {
    match p {
        Packet::Ram(r) => {
            if r.is_sync() {
                s.sync_packets += 1;
            }
            s.ram_packets += 1;
            if r.normal_pages + r.zero_pages == 0 {
                return;
            }
            s.normal_pages += u64::from(r.normal_pages);
            s.zero_pages += u64::from(r.zero_pages);
            s.payload_bytes += r.payload.len() as u64;
            s.compression.insert(r.compression().name());
            let name = String::from_utf8_lossy(r.block_name()).into_owned();
            let key = if s.blocks.len() < KEEP_BLOCKS || s.blocks.contains_key(&name) {
                name
            } else {
                "(other blocks)".into()
            };
            let e = s.blocks.entry(key).or_default();
            e.0 += u64::from(r.normal_pages);
            e.1 += u64::from(r.zero_pages);
        }
        Packet::DeviceState(d) => {
            s.device_state_packets += 1;
            s.device_state_bytes += d.data.len() as u64;
        }
    }
}

impl ChannelSummary {
    /// The summary as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "file": self.file, "channel_id": self.id, "uuid": self.uuid, "bytes": self.bytes,
            "ram_packets": self.ram_packets, "sync_packets": self.sync_packets,
            "device_state_packets": self.device_state_packets,
            "device_state_bytes": self.device_state_bytes,
            "normal_pages": self.normal_pages, "zero_pages": self.zero_pages,
            "payload_bytes": self.payload_bytes,
            "compression": self.compression.iter().collect::<Vec<_>>(),
            "blocks": self.blocks.iter().map(|(b, (n, z))| json!({"name": b, "normal_pages": n, "zero_pages": z})).collect::<Vec<_>>(),
            "error": self.error,
        })
    }

    /// One text line.
    pub fn line(&self) -> String {
        format!(
            "  channel {} ({}): {} RAM packets ({} SYNC), {} normal + {} zero pages, {} payload bytes, compression {}, {} device-state packets{}",
            self.id.map_or("?".into(), |i| i.to_string()),
            self.file,
            self.ram_packets,
            self.sync_packets,
            self.normal_pages,
            self.zero_pages,
            self.payload_bytes,
            if self.compression.is_empty() {
                "-".to_string()
            } else {
                self.compression.iter().copied().collect::<Vec<_>>().join("/")
            },
            self.device_state_packets,
            self.error
                .as_ref()
                .map(|e| format!("; error: {e}"))
                .unwrap_or_default()
        )
    }
}
