//! Multifd channels applied with the main stream, CLI side: the packet
//! reader, the per-channel loop and the offline applier live in
//! [`qmig_ram_dst::multifd_offline`] (shared by `recv`'s sockets,
//! [`crate::multifd_recv`], `extract`'s capture sets and the Python
//! package); here are the channel files opened as the CLI opens inputs,
//! the per-channel report and `roundtrip --multifd-channel`.

use std::path::{Path, PathBuf};

use qmig_ram_dst::multifd::MultifdError;
pub(crate) use qmig_ram_dst::multifd_offline::{check_init, Channel, PacketReader, Reached};
use qmig_wire::multifd::INIT_LEN;

/// The offline applier over channel files opened as every CLI input
/// ([`crate::input::open`]: containers peeled).
pub(crate) type OfflineChannels =
    qmig_ram_dst::multifd_offline::OfflineChannels<crate::input::Input>;

/// An [`OfflineChannels`] over the files `paths`.
pub(crate) fn offline_channels(paths: &[PathBuf]) -> OfflineChannels {
    OfflineChannels::new(paths, |p| {
        crate::input::open(p)
            .map(|o| o.input)
            .map_err(|e| e.to_string())
    })
}

/// Prints one line per channel (unless `--quiet`).
pub(crate) fn report(stats: &[(u32, qmig_ram_dst::multifd::ChannelStats)]) {
    if crate::progress::quiet() {
        return;
    }
    for (id, s) in stats {
        eprintln!(
            "qmig: multifd channel {id}: {} packets ({} SYNC), {} normal + {} zero pages{}",
            s.packets,
            s.syncs,
            s.normal_pages,
            s.zero_pages,
            if s.device_state_packets > 0 {
                format!(
                    ", {} device-state packets (not applied)",
                    s.device_state_packets
                )
            } else {
                String::new()
            }
        );
    }
}

/// `qmig roundtrip --multifd-channel FILE`: re-serializes the channel
/// header and every packet of `path` (target page size `page_size`) and
/// compares with the bytes read. `Ok(None)` when identical (a line is
/// printed), else the first difference.
///
/// # Errors
/// The file cannot be opened or read, or does not parse.
pub(crate) fn roundtrip_channel(
    path: &Path,
    page_size: u64,
) -> Result<Option<String>, crate::error::CliError> {
    use crate::error::CliError;
    let input = crate::input::open(path)?.input;
    let fail = |e: MultifdError| CliError::Data {
        message: format!("{}: {e}", path.display()),
        offset: Some(e.offset()),
    };
    let mut rd = PacketReader::new(input, 0, page_size, None);
    let Some(init) = rd.init().map_err(fail)? else {
        return Ok(Some("empty channel file".into()));
    };
    let mut out = Vec::with_capacity(1 << 20);
    init.write(&mut out);
    if rd.raw_since(0).map(|b| &b[..INIT_LEN.min(b.len())]) != Some(&out[..]) {
        return Ok(Some("the channel header re-serializes differently".into()));
    }
    let mut packets = 0u64;
    loop {
        out.clear();
        let at = match rd.next_packet().map_err(fail)? {
            None => break,
            Some((at, p)) => {
                if let Err(e) = p.write(&mut out, page_size) {
                    return Ok(Some(format!(
                        "offset {at}: packet does not re-serialize: {e}"
                    )));
                }
                at
            }
        };
        let orig = rd.raw_since(at).unwrap_or_default();
        if orig != &out[..] {
            let i = out.iter().zip(orig).position(|(a, b)| a != b).unwrap_or(0);
            return Ok(Some(format!(
                "difference at offset {}: packet at {at} re-serializes differently",
                at + i as u64
            )));
        }
        packets += 1;
    }
    println!(
        "{}: identical: channel {} header and {packets} packets, {} bytes",
        path.display(),
        init.id,
        rd.position()
    );
    Ok(None)
}
