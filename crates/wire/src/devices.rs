//! Device-section lengths from the vmdesc: how the decoder delimits device
//! (non-RAM) sections without looking at the guest-controlled bytes inside
//! them.
//!
//! A device section's payload is VMState with no length prefix (wire-format
//! §1); QEMU records in the vmdesc how many bytes each field took on the
//! wire, so the payload length of every described section is known exactly
//! before its first byte is read. The decoder asks a [`DeviceTable`] for
//! that length by `(idstr, instance_id)`, the key QEMU's vmdesc `devices`
//! entries carry (`"name"`, `"instance_id"`).

use std::collections::HashMap;

use crate::error::WireError;

/// Exact payload lengths (bytes) of device sections, keyed by idstr and
/// instance id, plus the vmdesc's target page size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTable {
    lengths: HashMap<(String, u32), u64>,
    page_size: Option<u64>,
}

impl DeviceTable {
    /// An empty table with the vmdesc's `page_size` (bytes), if it had one.
    pub fn new(page_size: Option<u64>) -> Self {
        DeviceTable {
            lengths: HashMap::new(),
            page_size,
        }
    }

    /// Records that section `(idstr, instance)` has a payload of `len` bytes.
    pub fn insert(&mut self, idstr: &str, instance: u32, len: u64) {
        self.lengths.insert((idstr.to_string(), instance), len);
    }

    /// The payload length in bytes of section `(idstr, instance)`, if the
    /// vmdesc describes it.
    pub fn len_of(&self, idstr: &str, instance: u32) -> Option<u64> {
        self.lengths.get(&(idstr.to_string(), instance)).copied()
    }

    /// The target page size the vmdesc announced (bytes).
    pub fn page_size(&self) -> Option<u64> {
        self.page_size
    }

    /// Number of described sections.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Whether no section is described.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Builds the table from vmdesc JSON (the trailer's bytes, without the
    /// `0x06` + be32 framing).
    ///
    /// # Errors
    /// [`WireError::Vmdesc`] when the JSON is not a vmdesc QEMU writes
    /// (offset 0: the caller shifts it to the trailer's position).
    pub fn from_vmdesc_json(json: &[u8]) -> Result<Self, WireError> {
        let desc = crate::vmstate::VmDesc::parse(json)?;
        let mut t = DeviceTable::new(desc.page_size());
        for d in desc.devices() {
            t.insert(d.name(), d.instance_id(), d.payload_len());
        }
        Ok(t)
    }
}
