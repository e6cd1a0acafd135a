//! The container around the RAM records, copied from a template stream.
//!
//! A precopy stream from QEMU is: header, configuration, (commands), the
//! `ram` START section (MEM_SIZE), PART sections, (SWITCHOVER_START), the
//! `ram` END section, device FULL sections, EOF, vmdesc. [`Template::parse`]
//! keeps everything that is not RAM records so that a new stream can be
//! written with fresh RAM sections in between: the header and configuration
//! byte for byte, the `ram` section's id, instance and version, whether
//! sections carry footers, whether SWITCHOVER_START precedes END, and every
//! byte after the `ram` END section (device state, EOF, vmdesc) verbatim.
//!
//! A postcopy capture works too: its device sections are taken from inside
//! the PACKAGED blob (between POSTCOPY_LISTEN and the pings), its discards,
//! pings and advice are dropped. [`Template::device_state`] gives the device
//! sections of either kind, for a precopy tail or a postcopy package.

use qmig_wire::section::{self, write_footer};
use qmig_wire::{
    Command, ConfigBody, Item, MemBlock, RamBody, SectionHeader, SectionIdent, SectionKind,
    SliceReader,
};

use crate::RamSrcError;

/// The non-RAM parts of a template stream. See the module documentation.
#[derive(Debug, Clone)]
pub struct Template<'a> {
    stream: &'a [u8],
    prefix: Vec<u8>,
    /// Machine type from the configuration section.
    pub machine: &'a str,
    /// log2 of the target page size (12 when the configuration does not say).
    pub page_bits: u32,
    /// Capabilities listed in the configuration.
    pub capabilities: Vec<&'a str>,
    /// Section id of `ram`.
    pub ram_section_id: u32,
    /// Instance id of `ram`.
    pub ram_instance: u32,
    /// Version of `ram` (4).
    pub ram_version: u32,
    /// Whether sections end with a footer.
    pub footers: bool,
    /// Whether SWITCHOVER_START was sent before the `ram` END section.
    pub switchover_start: bool,
    /// The template's MEM_SIZE block list.
    pub mem_blocks: Vec<MemBlock<'a>>,
    /// Commands of the template that a new stream leaves out (return path,
    /// postcopy advice and pings belong to a live session, not to a replay).
    pub dropped_commands: Vec<&'static str>,
    /// Whether the template is a postcopy capture: its device state came
    /// inside the PACKAGED blob rather than after the `ram` END section.
    pub postcopy: bool,
    tail: usize,
    /// Byte range of the device (FULL) sections, wherever they were.
    devices: (usize, usize),
    /// Offset of the EOF byte (end of the stream when it has none).
    eof: usize,
}

impl<'a> Template<'a> {
    /// Reads the container parts of `stream`.
    ///
    /// # Errors
    /// [`RamSrcError::Wire`] when the stream does not parse up to the end of
    /// the `ram` END section; [`RamSrcError::Template`] when it has no `ram`
    /// START/END, two PACKAGED commands, a package holding anything but
    /// LISTEN, FULL device sections, PINGs and RUN, another iterative
    /// section, or device sections before `ram` ends.
    pub fn parse(stream: &'a [u8]) -> Result<Self, RamSrcError> {
        let bad = |why: String| RamSrcError::Template { why };
        let mut t = Template {
            stream,
            prefix: Vec::new(),
            machine: "",
            page_bits: 12,
            capabilities: Vec::new(),
            ram_section_id: 0,
            ram_instance: 0,
            ram_version: 4,
            footers: false,
            switchover_start: false,
            mem_blocks: Vec::new(),
            dropped_commands: Vec::new(),
            postcopy: false,
            tail: stream.len(),
            devices: (stream.len(), stream.len()),
            eof: stream.len(),
        };
        let mut ram_id = None;
        let mut in_end = false;
        let mut end_footer_seen = false;
        let mut tail_found = false;
        // Inside PACKAGED: (start, end) of its device sections so far.
        let mut package: Option<(Option<usize>, Option<usize>)> = None;
        for r in SliceReader::new(stream) {
            let (offset, item) = r?;
            let offset = offset as usize;
            if tail_found {
                if item == Item::Eof {
                    t.eof = offset;
                    break;
                }
                continue;
            }
            if in_end {
                let ours = matches!(item, Item::Ram(_))
                    || (!end_footer_seen && item == Item::Footer(t.ram_section_id));
                if !ours || end_footer_seen {
                    t.tail = offset;
                    tail_found = true;
                    if item == Item::Eof {
                        t.eof = offset;
                        break;
                    }
                    continue;
                }
                if matches!(item, Item::Footer(_)) {
                    end_footer_seen = true;
                }
                continue;
            }
            if let Some((start, end)) = package.as_mut() {
                match &item {
                    Item::Section(h) if h.kind == SectionKind::Full && end.is_none() => {
                        start.get_or_insert(offset);
                    }
                    Item::Section(h) => {
                        return Err(bad(format!(
                            "{} section inside the postcopy package",
                            h.kind.name()
                        )))
                    }
                    Item::DeviceData(_) | Item::Footer(_) => {}
                    Item::Command(Command::PostcopyListen) if start.is_none() => {}
                    Item::Command(Command::Ping(_) | Command::PostcopyRun) | Item::PackageEnd => {
                        if start.is_some() {
                            end.get_or_insert(offset);
                        }
                        if item == Item::PackageEnd {
                            let s = start.unwrap_or(offset);
                            t.devices = (s, end.unwrap_or(offset));
                            package = None;
                        }
                    }
                    other => {
                        return Err(bad(format!(
                            "{} inside the postcopy package at offset {offset}",
                            other.kind_name()
                        )))
                    }
                }
                continue;
            }
            match &item {
                Item::Header { .. } => item.write(&mut t.prefix)?,
                Item::Configuration(c) => {
                    item.write(&mut t.prefix)?;
                    t.machine = c.machine;
                    t.page_bits = c.target_page_bits().unwrap_or(12);
                    t.capabilities = c
                        .subsections
                        .iter()
                        .filter_map(|s| match &s.body {
                            ConfigBody::Capabilities(c) => Some(c.iter().copied()),
                            _ => None,
                        })
                        .flatten()
                        .collect();
                }
                Item::Command(Command::SwitchoverStart) => t.switchover_start = true,
                Item::Command(Command::Packaged { .. }) => {
                    if t.postcopy {
                        return Err(bad("two PACKAGED commands".into()));
                    }
                    t.postcopy = true;
                    package = Some((None, None));
                }
                Item::Command(c) => t.dropped_commands.push(c.name()),
                Item::Section(h) => match (h.kind, h.ident) {
                    (SectionKind::Start, Some(id)) if id.idstr == "ram" => {
                        if ram_id.is_some() {
                            return Err(bad("two ram START sections".into()));
                        }
                        ram_id = Some(h.section_id);
                        t.ram_section_id = h.section_id;
                        t.ram_instance = id.instance;
                        t.ram_version = id.version;
                    }
                    (SectionKind::Start | SectionKind::Full, Some(id)) => {
                        return Err(bad(format!(
                            "section \"{}\" ({}) before the end of ram: not supported",
                            id.idstr,
                            h.kind.name()
                        )))
                    }
                    (SectionKind::Part | SectionKind::End, _) if Some(h.section_id) != ram_id => {
                        return Err(bad(format!(
                            "{} of section {} that is not ram",
                            h.kind.name(),
                            h.section_id
                        )))
                    }
                    (SectionKind::End, _) => in_end = true,
                    _ => {}
                },
                Item::Ram(rec) => {
                    if let RamBody::MemSize(b) = &rec.body {
                        t.mem_blocks.clone_from(b);
                    }
                }
                Item::Footer(id) if Some(*id) == ram_id => t.footers = true,
                Item::Eof => return Err(bad("EOF before the ram END section".into())),
                _ => {}
            }
        }
        if !in_end {
            return Err(bad("no ram END section".into()));
        }
        if !t.postcopy {
            // Precopy: the device sections follow the ram END section.
            t.devices = (t.tail, t.eof);
        }
        Ok(t)
    }

    /// The template's MEM_SIZE entry for block `name`.
    #[must_use]
    pub fn mem_block(&self, name: &str) -> Option<&MemBlock<'a>> {
        self.mem_blocks.iter().find(|b| b.name == name)
    }

    /// Whether the configuration lists capability `cap`.
    #[must_use]
    pub fn has_capability(&self, cap: &str) -> bool {
        self.capabilities.contains(&cap)
    }

    /// Writes the header and configuration, as in the template.
    pub fn write_prefix(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix);
    }

    /// Writes a `ram` section header of `kind` (START carries the idstr,
    /// instance and version).
    ///
    /// # Errors
    /// [`RamSrcError::Wire`] if the header cannot be written (see
    /// [`SectionHeader::write`]).
    pub fn begin_section(&self, kind: SectionKind, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        SectionHeader {
            kind,
            section_id: self.ram_section_id,
            ident: kind.introduces().then_some(SectionIdent {
                idstr: "ram",
                instance: self.ram_instance,
                version: self.ram_version,
            }),
        }
        .write(out)?;
        Ok(())
    }

    /// Ends a `ram` section: its footer, when the template's sections have one.
    pub fn end_section(&self, out: &mut Vec<u8>) {
        if self.footers {
            write_footer(out, self.ram_section_id);
        }
    }

    /// Writes SWITCHOVER_START when the template had it.
    ///
    /// # Errors
    /// [`RamSrcError::Wire`] (not expected: the command has no payload).
    pub fn write_switchover(&self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        if self.switchover_start {
            Command::SwitchoverStart.write(out)?;
        }
        Ok(())
    }

    /// Everything after the `ram` END section: device sections, EOF, vmdesc.
    #[must_use]
    pub fn tail(&self) -> &'a [u8] {
        &self.stream[self.tail..]
    }

    /// Writes [`tail`](Self::tail).
    pub fn write_tail(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.tail());
    }

    /// The device (FULL) sections: after the `ram` END section in a precopy
    /// capture, inside the PACKAGED blob (between LISTEN and the pings) in a
    /// postcopy capture. Either way, what a new stream puts in its own
    /// device-state slot (after END in precopy, in the package in postcopy).
    #[must_use]
    pub fn device_state(&self) -> &'a [u8] {
        &self.stream[self.devices.0..self.devices.1]
    }

    /// The EOF byte and what follows it (vmdesc) in the template; for a
    /// postcopy capture just EOF (QEMU sends no vmdesc after postcopy).
    #[must_use]
    pub fn trailer(&self) -> &'a [u8] {
        if self.eof < self.stream.len() {
            &self.stream[self.eof..]
        } else {
            &[section::EOF]
        }
    }
}

/// A minimal template for examples and tests.
#[doc(hidden)]
pub mod tests_support {
    use qmig_wire::ram::flags;
    use qmig_wire::{
        Command, Configuration, MemBlock, RamRecord, SectionHeader, SectionIdent, SectionKind,
    };

    /// header, configuration `pc`, ram START (MEM_SIZE pc.ram 16 KiB) with
    /// footers, one PART, SWITCHOVER_START, END, EOF.
    #[must_use]
    pub fn tiny_template() -> Vec<u8> {
        let mut s = Vec::new();
        qmig_wire::header::write_header(&mut s);
        Configuration {
            machine: "pc",
            subsections: vec![],
        }
        .write(&mut s)
        .unwrap();
        let id = SectionIdent {
            idstr: "ram",
            instance: 0,
            version: 4,
        };
        let hdr = |kind, ident| SectionHeader {
            kind,
            section_id: 2,
            ident,
        };
        hdr(SectionKind::Start, Some(id)).write(&mut s).unwrap();
        RamRecord::mem_size(vec![MemBlock {
            name: "pc.ram",
            used_length: 16384,
            page_size: None,
            addr: None,
        }])
        .write(&mut s)
        .unwrap();
        s.extend_from_slice(&flags::EOS.to_be_bytes());
        qmig_wire::section::write_footer(&mut s, 2);
        hdr(SectionKind::Part, None).write(&mut s).unwrap();
        RamRecord::zero(0, Some("pc.ram")).write(&mut s).unwrap();
        s.extend_from_slice(&flags::EOS.to_be_bytes());
        qmig_wire::section::write_footer(&mut s, 2);
        Command::SwitchoverStart.write(&mut s).unwrap();
        hdr(SectionKind::End, None).write(&mut s).unwrap();
        s.extend_from_slice(&flags::EOS.to_be_bytes());
        qmig_wire::section::write_footer(&mut s, 2);
        s.push(0);
        s
    }
}
