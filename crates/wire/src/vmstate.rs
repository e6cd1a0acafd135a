//! The vmdesc description of device state (interim: lengths only).

use serde_json::Value;

use crate::error::WireError;

/// A parsed vmdesc.
#[derive(Debug, Clone)]
pub struct VmDesc {
    page_size: Option<u64>,
    devices: Vec<DeviceDesc>,
}

/// One device entry of a vmdesc.
#[derive(Debug, Clone)]
pub struct DeviceDesc {
    name: String,
    instance_id: u32,
    payload_len: u64,
}

fn bad(why: &'static str) -> WireError {
    WireError::Vmdesc { offset: 0, why }
}

impl VmDesc {
    /// Parses vmdesc JSON.
    ///
    /// # Errors
    /// [`WireError::Vmdesc`] when it is not a vmdesc.
    pub fn parse(json: &[u8]) -> Result<VmDesc, WireError> {
        let v: Value = serde_json::from_slice(json).map_err(|_| bad("not valid JSON"))?;
        let page_size = v.get("page_size").and_then(Value::as_u64);
        let mut devices = Vec::new();
        for d in v
            .get("devices")
            .and_then(Value::as_array)
            .ok_or(bad("no devices list"))?
        {
            devices.push(DeviceDesc {
                name: d
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or(bad("device without a name"))?
                    .to_string(),
                instance_id: d
                    .get("instance_id")
                    .and_then(Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or(bad("device without an instance_id"))?,
                payload_len: struct_len(d, 0)?,
            });
        }
        Ok(VmDesc { page_size, devices })
    }

    /// The `page_size` field (bytes).
    pub fn page_size(&self) -> Option<u64> {
        self.page_size
    }

    /// The device entries.
    pub fn devices(&self) -> &[DeviceDesc] {
        &self.devices
    }
}

fn struct_len(s: &Value, depth: u32) -> Result<u64, WireError> {
    if depth > 64 {
        return Err(bad("nested too deeply"));
    }
    let mut n: u64 = 0;
    for f in s
        .get("fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let size = f
            .get("size")
            .and_then(Value::as_u64)
            .ok_or(bad("field without a size"))?;
        let count = f.get("array_len").and_then(Value::as_u64).unwrap_or(1);
        n = size
            .checked_mul(count)
            .and_then(|x| n.checked_add(x))
            .ok_or(bad("length overflows"))?;
    }
    for sub in s
        .get("subsections")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = sub
            .get("vmsd_name")
            .and_then(Value::as_str)
            .ok_or(bad("subsection without a name"))?;
        n = n
            .checked_add(6 + name.len() as u64)
            .and_then(|x| x.checked_add(struct_len(sub, depth + 1).ok()?))
            .ok_or(bad("length overflows"))?;
    }
    Ok(n)
}

impl DeviceDesc {
    /// Section idstr.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Instance id.
    pub fn instance_id(&self) -> u32 {
        self.instance_id
    }
    /// Payload length in bytes.
    pub fn payload_len(&self) -> u64 {
        self.payload_len
    }
}
