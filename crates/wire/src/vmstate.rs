//! Device state decoded field by field from the vmdesc (the JSON trailer a
//! QEMU precopy stream carries after EOF).
//!
//! # What the vmdesc says
//!
//! While it saves the non-iterable devices, QEMU records what it wrote
//! (`migration/savevm.c`: `qemu_savevm_state_complete_precopy_non_iterable`,
//! `vmstate_save`, `vmstate_save_old_style`; `migration/vmstate.c`:
//! `vmstate_save_state_v`, `vmsd_desc_field_start`, `vmsd_desc_field_end`,
//! `vmstate_subsection_save`):
//!
//! ```text
//! {"configuration": {...}?,                 the configuration section's description
//!  "page_size": N,                          target page size in bytes
//!  "devices": [
//!    {"name": idstr, "instance_id": N,      matched to a FULL/START header
//!     "vmsd_name": S, "version": N,         absent for old-style (non-VMSD) sections
//!     "fields": [
//!       {"name": S,
//!        "array_len": N | "index": N,       compressed array (N elements of `size`)
//!                                           or one element of an uncompressed one
//!        "type": S,                         QEMU's VMStateInfo name, or "struct"
//!        "struct": {"vmsd_name", "version", "fields", "subsections"?},
//!        "size": N},                        bytes this element took on the wire
//!       ...],
//!     "subsections": [{"vmsd_name", "version", "fields", "subsections"?}, ...]?},
//!    ...]}
//! ```
//!
//! Only what was sent is described: a subsection appears only if its
//! `needed` hook said yes, a field only if it existed for the version. An
//! old-style section (`SaveVMHandlers::save_state`, no VMSD) is one field
//! `{"name":"data","type":"buffer","size":N}`.
//!
//! # What is on the wire
//!
//! A device section's payload is its fields in order, each `size` bytes
//! (`array_len × size` for a compressed array; a struct field's `size`
//! covers its own fields and subsections), then each subsection as
//! `u8 0x05, u8 name length, name (its vmsd_name), be32 version`, its fields
//! and its own subsections. So the payload length follows from the
//! description alone ([`DeviceDesc::payload_len`]) and guest-controlled
//! bytes never change how a payload is cut.
//!
//! # Values
//!
//! Integers are big-endian (`qemu_put_be*`), including `int32 le` (a
//! "less or equal" load check, not little-endian). `bool` is one byte.
//! `nullptr` is the byte `'0'` QEMU writes for a NULL element of an array of
//! pointers. Every other type (`buffer`, `unused_buffer`, `bitmap`, `timer`,
//! `tmp`, `vstruct`, `pci config`, ...) is kept as its raw bytes.
//!
//! [`DeviceState`] serializes (serde) to the shape QEMU's
//! `scripts/analyze-migration.py -d state` prints for a device: an object of
//! fields in order, integers as `"0x%0Nx"` (2 hex digits per byte, negative
//! signed values followed by ` (-N)`), booleans as JSON booleans, raw bytes
//! as space-separated hex pairs, repeated names (array elements) grouped
//! into a list, structs as nested objects, subsections under their
//! `vmsd_name`. [`DeviceState::to_text`] gives a readable listing. One
//! deliberate difference: analyze-migration.py prints `uint8 equal`,
//! `uint16 equal` and `int64 equal` (QEMU's name for its uint64 equality
//! check) as signed; qmig follows QEMU's types and prints them unsigned (no
//! ` (-N)` suffix). On the committed captures no such value has its top bit
//! set, so the outputs are equal there.
//!
//! # Limits and errors
//!
//! [`VmDesc::parse`] rejects (as [`WireError::Vmdesc`]) JSON over
//! [`DEFAULT_MAX_VMDESC`](crate::vmdesc::DEFAULT_MAX_VMDESC) bytes, nested
//! deeper than [`MAX_JSON_DEPTH`], with more than [`MAX_OBJECTS`] objects, a
//! device that would decode to more than [`MAX_DECODED_NODES`] values (all
//! devices: [`MAX_TOTAL_NODES`]), and
//! any entry QEMU would not write (missing keys, a struct whose `size`
//! differs from what its fields add up to, lengths that overflow, a
//! duplicate `(name, instance_id)`). [`DeviceDesc::decode`] returns
//! [`WireError::VmStateMismatch`] for a subsection marker, name or version
//! (or a NULL marker) that differs from the description, and
//! [`WireError::VmStateLength`] when the payload is shorter or longer than the
//! description; both carry the absolute stream offset.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use crate::error::WireError;

/// Deepest JSON nesting (objects and arrays) accepted in a vmdesc. QEMU's
/// x86 machines reach 10.
pub const MAX_JSON_DEPTH: usize = 64;
/// Most JSON objects (devices, fields, structs, subsections) accepted in a
/// vmdesc.
pub const MAX_OBJECTS: usize = 1_000_000;
/// Most values (fields, array elements, struct elements, subsections) one
/// device may decode to, which bounds [`DeviceDesc::decode`]'s allocations.
pub const MAX_DECODED_NODES: u64 = 1_000_000;
/// Most values all devices of one vmdesc may decode to, which bounds the work
/// of decoding every section of a stream whatever the vmdesc says (arrays of
/// zero-size elements take no payload bytes). QEMU's x86 `pc` machine with
/// one vCPU has about 3,000.
pub const MAX_TOTAL_NODES: u64 = 4_000_000;

/// Subsection marker byte (`QEMU_VM_SUBSECTION`).
pub const SUBSECTION: u8 = 0x05;
/// The byte QEMU writes for a NULL element (`VMS_NULLPTR_MARKER`, `'0'`).
pub const NULLPTR_MARKER: u8 = 0x30;

/// A parsed, validated vmdesc.
#[derive(Debug, Clone)]
pub struct VmDesc {
    page_size: Option<u64>,
    configuration: Option<StructDesc>,
    devices: Vec<DeviceDesc>,
    index: HashMap<(String, u32), usize>,
}

/// One entry of the vmdesc's `"devices"`: the description of one FULL (or
/// START) device section.
#[derive(Debug, Clone)]
pub struct DeviceDesc {
    name: String,
    instance_id: u32,
    body: StructDesc,
}

/// A VMState description (a device's top level, a struct or a subsection):
/// its fields and the subsections that were sent.
#[derive(Debug, Clone)]
pub struct StructDesc {
    vmsd_name: Option<Arc<str>>,
    version: Option<u32>,
    fields: Vec<FieldDesc>,
    subsections: Vec<StructDesc>,
    /// Wire length of fields + subsections.
    len: u64,
    /// Values it decodes to (see [`MAX_DECODED_NODES`]).
    nodes: u64,
}

/// How a field entry repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One value.
    Single,
    /// Element `i` of an array QEMU could not compress (`"index"`).
    Index(u32),
    /// A compressed array of `n` elements of `size` bytes each (`"array_len"`).
    Array(u32),
}

/// How a field's bytes are decoded.
#[derive(Debug, Clone)]
pub enum FieldKind {
    /// `bool`: one byte, non-zero is true.
    Bool,
    /// A big-endian integer of `size` bytes (1 to 8).
    Int {
        /// Whether QEMU's type is signed (`int*`), else unsigned (`uint*`).
        signed: bool,
    },
    /// `nullptr`: the marker byte `'0'`.
    Nullptr,
    /// `capability`: `u8` length then that many name bytes.
    Capability,
    /// A nested VMState struct (`"struct"` in the vmdesc).
    Struct(Box<StructDesc>),
    /// Anything else: raw bytes.
    Bytes,
}

/// One entry of a `"fields"` list.
#[derive(Debug, Clone)]
pub struct FieldDesc {
    name: Arc<str>,
    type_name: Arc<str>,
    size: u64,
    layout: Layout,
    kind: FieldKind,
}

/// A decoded integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntValue {
    /// Width in bytes (1 to 8).
    pub size: u8,
    /// Whether QEMU's type is signed.
    pub signed: bool,
    /// The bytes read big-endian, zero-extended.
    pub raw: u64,
}

impl IntValue {
    /// The value as a signed integer (sign-extended from `size` bytes).
    pub fn as_i64(&self) -> i64 {
        let shift = 64 - 8 * u32::from(self.size);
        ((self.raw << shift) as i64) >> shift
    }

    /// analyze-migration.py's text: `0x%0Nx`, and for a negative signed
    /// value ` (-N)` after the unsigned hex.
    pub fn display(&self) -> String {
        let width = usize::from(self.size) * 2;
        if self.signed && self.as_i64() < 0 {
            format!("0x{:0width$x} ({})", self.raw, self.as_i64())
        } else {
            format!("0x{:0width$x}", self.raw)
        }
    }
}

/// One decoded element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A `bool`.
    Bool(bool),
    /// An integer type.
    Int(IntValue),
    /// A NULL pointer element.
    Nullptr,
    /// A capability name (configuration section).
    Capability(String),
    /// A nested struct.
    Struct(Box<StructState>),
    /// Raw bytes (buffers and every type without a decoder).
    Bytes(Vec<u8>),
}

/// A decoded field entry: one value, or the elements of a compressed array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldState {
    /// Field name as the vmdesc spells it (QEMU appends `[n]` to names that
    /// repeat in one VMSD).
    pub name: Arc<str>,
    /// The vmdesc `"type"`.
    pub type_name: Arc<str>,
    /// `"index"` of an uncompressed array element.
    pub index: Option<u32>,
    /// Absolute stream offset of the first byte.
    pub offset: u64,
    /// One element for [`Layout::Single`] and [`Layout::Index`], `array_len`
    /// elements for [`Layout::Array`].
    pub values: Vec<Value>,
}

/// A decoded VMState (a device's top level, a struct or a subsection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructState {
    /// The VMSD name (absent for an old-style section).
    pub vmsd_name: Option<Arc<str>>,
    /// Version, from the description (the wire's for a subsection, which must match).
    pub version: Option<u32>,
    /// Fields in wire order.
    pub fields: Vec<FieldState>,
    /// Subsections in wire order.
    pub subsections: Vec<StructState>,
}

/// A device section decoded with its [`DeviceDesc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The section idstr.
    pub name: String,
    /// The section instance id.
    pub instance_id: u32,
    /// The decoded fields and subsections.
    pub state: StructState,
}

/// Checks nesting depth and object count on the raw bytes before anything
/// is built, so the caps bound the parser's recursion and allocations.
fn prescan(json: &[u8]) -> Result<(), WireError> {
    let (mut depth, mut objects) = (0usize, 0usize);
    let (mut in_str, mut esc) = (false, false);
    for (i, &b) in json.iter().enumerate() {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(WireError::Vmdesc {
                        offset: i as u64,
                        why: format!("nested deeper than {MAX_JSON_DEPTH} levels"),
                    });
                }
                if b == b'{' {
                    objects += 1;
                    if objects > MAX_OBJECTS {
                        return Err(WireError::Vmdesc {
                            offset: i as u64,
                            why: format!("more than {MAX_OBJECTS} objects"),
                        });
                    }
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn json_offset(json: &[u8], e: &serde_json::Error) -> u64 {
    // serde_json reports 1-based line and column.
    let mut line = 1;
    let mut pos = 0usize;
    while line < e.line() && pos < json.len() {
        if json[pos] == b'\n' {
            line += 1;
        }
        pos += 1;
    }
    (pos + e.column().saturating_sub(1)).min(json.len()) as u64
}

/// Names are interned so decoded states share them with the description.
#[derive(Default)]
struct Interner(HashMap<String, Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(s.to_string(), a.clone());
        a
    }
}

fn int_kind(type_name: &str) -> Option<bool> {
    // QEMU's VMStateInfo names (migration/vmstate-types.c). "int64 equal"
    // is QEMU's name for the uint64 equality check.
    match type_name {
        "int8" | "int16" | "int32" | "int64" | "int32 equal" | "int32 le" => Some(true),
        "uint8" | "uint16" | "uint32" | "uint64" | "uint8 equal" | "uint16 equal"
        | "uint32 equal" | "int64 equal" => Some(false),
        _ => None,
    }
}

/// Parser state shared by the serde seeds: interned names and the path of
/// the entry being read (for messages).
struct Ctx {
    names: Interner,
    path: Vec<String>,
}

impl Ctx {
    fn err<E: de::Error>(&self, why: impl fmt::Display) -> E {
        E::custom(format_args!("{}: {why}", self.path.join(".")))
    }
}

/// What an object in the vmdesc is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// An entry of `"devices"`.
    Device,
    /// A `"struct"` (need_name: false) or a subsection (need_name: true).
    Struct { need_name: bool },
    /// An entry of `"fields"`.
    Field,
}

/// The keys QEMU writes; anything else is skipped.
enum Key {
    Name,
    InstanceId,
    VmsdName,
    Version,
    Fields,
    Subsections,
    Size,
    Type,
    Index,
    ArrayLen,
    Struct,
    PageSize,
    Devices,
    Configuration,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "name" => Key::Name,
                    "instance_id" => Key::InstanceId,
                    "vmsd_name" => Key::VmsdName,
                    "version" => Key::Version,
                    "fields" => Key::Fields,
                    "subsections" => Key::Subsections,
                    "size" => Key::Size,
                    "type" => Key::Type,
                    "index" => Key::Index,
                    "array_len" => Key::ArrayLen,
                    "struct" => Key::Struct,
                    "page_size" => Key::PageSize,
                    "devices" => Key::Devices,
                    "configuration" => Key::Configuration,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// A finished object.
enum Built {
    Device(DeviceDesc),
    Struct(StructDesc),
    Field(FieldDesc),
}

/// Keys read from one object (later duplicates win, as in QEMU's JSON
/// writer output read by Python).
#[derive(Default)]
struct Obj {
    name: Option<Arc<str>>,
    instance_id: Option<u64>,
    vmsd_name: Option<Arc<str>>,
    version: Option<u64>,
    fields: Option<Vec<FieldDesc>>,
    subsections: Option<Vec<StructDesc>>,
    size: Option<u64>,
    type_name: Option<Arc<str>>,
    index: Option<u64>,
    array_len: Option<u64>,
    strukt: Option<StructDesc>,
}

struct ObjSeed<'c> {
    ctx: &'c mut Ctx,
    role: Role,
}

impl<'de> DeserializeSeed<'de> for ObjSeed<'_> {
    type Value = Built;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Built, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjSeed<'_> {
    type Value = Built;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Built, A::Error> {
        let (ctx, role) = (self.ctx, self.role);
        let is_struct = matches!(role, Role::Device | Role::Struct { .. });
        let mut o = Obj::default();
        while let Some(k) = m.next_key::<Key>()? {
            match k {
                Key::Name if role != (Role::Struct { need_name: true }) => {
                    let s: String = m.next_value()?;
                    if let Some(last) = ctx.path.last_mut() {
                        let _ = write!(last, " ({s})");
                    }
                    // Field names are mostly distinct: not interned.
                    o.name = Some(Arc::from(s));
                }
                Key::InstanceId if role == Role::Device => o.instance_id = Some(m.next_value()?),
                Key::Size if !matches!(role, Role::Struct { .. }) => o.size = Some(m.next_value()?),
                Key::VmsdName if is_struct => {
                    let s: String = m.next_value()?;
                    o.vmsd_name = Some(ctx.names.get(&s));
                }
                Key::Version if is_struct => o.version = Some(m.next_value()?),
                Key::Fields if is_struct => {
                    let list = m.next_value_seed(ListSeed {
                        ctx: &mut *ctx,
                        role: Role::Field,
                        what: "fields",
                    })?;
                    o.fields = Some(list.fields);
                }
                Key::Subsections if is_struct => {
                    let list = m.next_value_seed(ListSeed {
                        ctx: &mut *ctx,
                        role: Role::Struct { need_name: true },
                        what: "subsections",
                    })?;
                    o.subsections = Some(list.structs);
                }
                Key::Type if role == Role::Field => {
                    let s: String = m.next_value()?;
                    o.type_name = Some(ctx.names.get(&s));
                }
                Key::Index if role == Role::Field => o.index = Some(m.next_value()?),
                Key::ArrayLen if role == Role::Field => o.array_len = Some(m.next_value()?),
                Key::Struct if role == Role::Field => {
                    ctx.path.push("struct".into());
                    let s = m.next_value_seed(ObjSeed {
                        ctx: &mut *ctx,
                        role: Role::Struct { need_name: false },
                    })?;
                    ctx.path.pop();
                    if let Built::Struct(s) = s {
                        o.strukt = Some(s);
                    }
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        match role {
            Role::Field => finish_field(ctx, o).map(Built::Field),
            Role::Struct { need_name } => finish_struct(ctx, &mut o, need_name).map(Built::Struct),
            Role::Device => {
                let body = finish_struct(ctx, &mut o, false)?;
                let name = o.name.ok_or_else(|| ctx.err("missing \"name\""))?;
                let instance_id = o
                    .instance_id
                    .ok_or_else(|| ctx.err("missing \"instance_id\""))?;
                let instance_id = u32::try_from(instance_id).map_err(|_| {
                    ctx.err(format!("instance_id {instance_id} does not fit 32 bits"))
                })?;
                // Old-style sections record their whole length at the top.
                if let Some(size) = o.size {
                    if size != body.len {
                        return Err(ctx.err(format!(
                            "\"size\" is {size} but its fields add up to {}",
                            body.len
                        )));
                    }
                }
                Ok(Built::Device(DeviceDesc {
                    name: name.to_string(),
                    instance_id,
                    body,
                }))
            }
        }
    }
}

struct ListSeed<'c> {
    ctx: &'c mut Ctx,
    role: Role,
    what: &'static str,
}

/// A list read by [`ListSeed`], typed so no per-element enum is kept.
#[derive(Default)]
struct Lists {
    fields: Vec<FieldDesc>,
    structs: Vec<StructDesc>,
    devices: Vec<DeviceDesc>,
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Lists;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Lists, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Lists;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of {}", self.what)
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> Result<Lists, S::Error> {
        let mut out = Lists::default();
        for i in 0usize.. {
            self.ctx.path.push(format!("{}[{i}]", self.what));
            let b = s.next_element_seed(ObjSeed {
                ctx: &mut *self.ctx,
                role: self.role,
            })?;
            self.ctx.path.pop();
            match b {
                Some(Built::Field(f)) => out.fields.push(f),
                Some(Built::Struct(st)) => out.structs.push(st),
                Some(Built::Device(d)) => out.devices.push(d),
                None => break,
            }
        }
        out.fields.shrink_to_fit();
        out.structs.shrink_to_fit();
        Ok(out)
    }
}

fn to_u32<E: de::Error>(ctx: &Ctx, key: &str, v: Option<u64>) -> Result<Option<u32>, E> {
    v.map(|v| u32::try_from(v).map_err(|_| ctx.err(format!("\"{key}\" {v} does not fit 32 bits"))))
        .transpose()
}

fn finish_struct<E: de::Error>(ctx: &Ctx, o: &mut Obj, need_name: bool) -> Result<StructDesc, E> {
    if need_name && o.vmsd_name.is_none() {
        return Err(ctx.err("missing \"vmsd_name\""));
    }
    let version = to_u32(ctx, "version", o.version)?;
    let fields = o
        .fields
        .take()
        .ok_or_else(|| ctx.err("missing \"fields\""))?;
    let (mut len, mut nodes) = (0u64, 0u64);
    for f in &fields {
        let count = match f.layout {
            Layout::Array(n) => u64::from(n),
            _ => 1,
        };
        let bytes = f
            .size
            .checked_mul(count)
            .ok_or_else(|| ctx.err(format!("field {}: array length overflows", f.name)))?;
        len = len
            .checked_add(bytes)
            .ok_or_else(|| ctx.err(format!("field {}: length overflows", f.name)))?;
        let inner = match &f.kind {
            FieldKind::Struct(s) => s.nodes,
            _ => 0,
        };
        nodes = nodes.saturating_add(count.saturating_mul(inner.saturating_add(1)));
    }
    let subsections = o.subsections.take().unwrap_or_default();
    for s in &subsections {
        let name = s.vmsd_name.as_deref().unwrap_or("");
        if name.is_empty() || name.len() > 255 {
            return Err(ctx.err(format!(
                "subsection name must be 1 to 255 bytes, is {}",
                name.len()
            )));
        }
        if s.version.is_none() {
            return Err(ctx.err(format!("subsection {name}: missing \"version\"")));
        }
        // marker, name length, name, be32 version
        len = len
            .checked_add(6 + name.len() as u64)
            .and_then(|l| l.checked_add(s.len))
            .ok_or_else(|| ctx.err(format!("subsection {name}: length overflows")))?;
        nodes = nodes.saturating_add(s.nodes.saturating_add(1));
    }
    if nodes > MAX_DECODED_NODES {
        return Err(ctx.err(format!("decodes to more than {MAX_DECODED_NODES} values")));
    }
    Ok(StructDesc {
        vmsd_name: o.vmsd_name.take(),
        version,
        fields,
        subsections,
        len,
        nodes,
    })
}

fn finish_field<E: de::Error>(ctx: &Ctx, o: Obj) -> Result<FieldDesc, E> {
    let name = o.name.ok_or_else(|| ctx.err("missing \"name\""))?;
    let type_name = o.type_name.ok_or_else(|| ctx.err("missing \"type\""))?;
    let size = o.size.ok_or_else(|| ctx.err("missing \"size\""))?;
    let layout = match (
        to_u32(ctx, "index", o.index)?,
        to_u32(ctx, "array_len", o.array_len)?,
    ) {
        (None, None) => Layout::Single,
        (Some(i), None) => Layout::Index(i),
        (None, Some(0)) => return Err(ctx.err("\"array_len\" is 0")),
        (None, Some(n)) => Layout::Array(n),
        (Some(_), Some(_)) => return Err(ctx.err("both \"index\" and \"array_len\"")),
    };
    let kind = match o.strukt {
        Some(sd) => {
            if sd.len != size {
                return Err(ctx.err(format!(
                    "\"size\" is {size} but its struct's fields and subsections add up to {}",
                    sd.len
                )));
            }
            FieldKind::Struct(Box::new(sd))
        }
        None if &*type_name == "struct" => {
            return Err(ctx.err("type \"struct\" without \"struct\""))
        }
        None => match (&*type_name, int_kind(&type_name)) {
            ("bool", _) if size == 1 => FieldKind::Bool,
            ("nullptr", _) if size == 1 => FieldKind::Nullptr,
            ("capability", _) if size >= 1 => FieldKind::Capability,
            (_, Some(signed)) if (1..=8).contains(&size) => FieldKind::Int { signed },
            _ => FieldKind::Bytes,
        },
    };
    Ok(FieldDesc {
        name,
        type_name,
        size,
        layout,
        kind,
    })
}

struct RootSeed<'c> {
    ctx: &'c mut Ctx,
}

impl<'de> DeserializeSeed<'de> for RootSeed<'_> {
    type Value = VmDesc;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<VmDesc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RootSeed<'_> {
    type Value = VmDesc;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a vmdesc object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<VmDesc, A::Error> {
        let ctx = self.ctx;
        let (mut page_size, mut configuration, mut list) = (None, None, None);
        while let Some(k) = m.next_key::<Key>()? {
            match k {
                Key::PageSize => page_size = Some(m.next_value::<u64>()?),
                Key::Configuration => {
                    ctx.path.push("configuration".into());
                    let b = m.next_value_seed(ObjSeed {
                        ctx: &mut *ctx,
                        role: Role::Struct { need_name: false },
                    })?;
                    ctx.path.pop();
                    if let Built::Struct(s) = b {
                        configuration = Some(s);
                    }
                }
                Key::Devices => {
                    list = Some(m.next_value_seed(ListSeed {
                        ctx: &mut *ctx,
                        role: Role::Device,
                        what: "devices",
                    })?)
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        let devices = list.ok_or_else(|| ctx.err("missing \"devices\""))?.devices;
        let total = devices
            .iter()
            .fold(0u64, |a, d| a.saturating_add(d.body.nodes));
        if total > MAX_TOTAL_NODES {
            return Err(ctx.err(format!(
                "devices decode to {total} values, more than {MAX_TOTAL_NODES}"
            )));
        }
        let mut index = HashMap::with_capacity(devices.len());
        for (i, d) in devices.iter().enumerate() {
            if index.insert((d.name.clone(), d.instance_id), i).is_some() {
                return Err(ctx.err(format!(
                    "device {} instance {} described twice",
                    d.name, d.instance_id
                )));
            }
        }
        Ok(VmDesc {
            page_size,
            configuration,
            devices,
            index,
        })
    }
}

impl VmDesc {
    /// Parses vmdesc JSON bytes (the trailer's body, or QEMU's
    /// `analyze-migration.py -d desc` output), straight into the typed
    /// description (no intermediate JSON tree).
    ///
    /// # Errors
    /// [`WireError::Vmdesc`] with the offset in `json` where the rule broke
    /// (for a rule about a whole entry: just after that entry): invalid JSON,
    /// over a cap ([`MAX_JSON_DEPTH`], [`MAX_OBJECTS`], [`MAX_DECODED_NODES`],
    /// [`MAX_TOTAL_NODES`])
    /// or an entry QEMU would not write (its path is in the message).
    /// [`WireError::TooLarge`] for JSON over
    /// [`DEFAULT_MAX_VMDESC`](crate::vmdesc::DEFAULT_MAX_VMDESC) bytes.
    pub fn parse(json: &[u8]) -> Result<VmDesc, WireError> {
        let cap = u64::from(crate::vmdesc::DEFAULT_MAX_VMDESC);
        if json.len() as u64 > cap {
            return Err(WireError::TooLarge {
                offset: 0,
                what: "vmdesc JSON",
                len: json.len() as u64,
                cap,
            });
        }
        prescan(json)?;
        let mut ctx = Ctx {
            names: Interner::default(),
            path: vec!["vmdesc".into()],
        };
        let mut de = serde_json::Deserializer::from_slice(json);
        let r = RootSeed { ctx: &mut ctx }
            .deserialize(&mut de)
            .and_then(|d| de.end().map(|()| d));
        r.map_err(|e| WireError::Vmdesc {
            offset: json_offset(json, &e),
            why: e.to_string(),
        })
    }

    /// The target page size in bytes (`"page_size"`), if given.
    pub fn page_size(&self) -> Option<u64> {
        self.page_size
    }

    /// The description of the configuration section, if given (QEMU ≥ 8.2).
    pub fn configuration(&self) -> Option<&StructDesc> {
        self.configuration.as_ref()
    }

    /// The device whose section has this idstr and instance id.
    pub fn device(&self, idstr: &str, instance_id: u32) -> Option<&DeviceDesc> {
        self.index
            .get(&(idstr.to_string(), instance_id))
            .map(|&i| &self.devices[i])
    }

    /// Every device, in the order QEMU saved them.
    pub fn devices(&self) -> &[DeviceDesc] {
        &self.devices
    }
}

impl DeviceDesc {
    /// The section idstr (`"name"`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The section instance id.
    pub fn instance_id(&self) -> u32 {
        self.instance_id
    }

    /// The VMSD version (`"version"`); 0 for an old-style section, whose
    /// vmdesc entry has none.
    pub fn version(&self) -> u32 {
        self.body.version.unwrap_or(0)
    }

    /// The VMSD name; `None` for an old-style section.
    pub fn vmsd_name(&self) -> Option<&str> {
        self.body.vmsd_name.as_deref()
    }

    /// The top-level description (fields and subsections).
    pub fn body(&self) -> &StructDesc {
        &self.body
    }

    /// Exact payload length in bytes of this device's section: every field's
    /// `size` (× `array_len`) plus, per subsection, 6 + its name length + its
    /// own length. Computed (overflow-checked) at parse time.
    pub fn payload_len(&self) -> u64 {
        self.body.len
    }

    /// Decodes a section payload field by field. `base` is the absolute
    /// stream offset of `payload[0]`, used in errors and in
    /// [`FieldState::offset`].
    ///
    /// # Errors
    /// [`WireError::VmStateMismatch`] when a subsection marker, name or
    /// version, a NULL marker or a capability length differs from the
    /// description; [`WireError::VmStateLength`] when the payload is not
    /// exactly [`DeviceDesc::payload_len`] bytes.
    pub fn decode(&self, payload: &[u8], base: u64) -> Result<DeviceState, WireError> {
        let mut c = Cursor {
            buf: payload,
            pos: 0,
            base,
            device: self,
        };
        let state = c.decode_struct(&self.body, &self.name)?;
        if c.pos != payload.len() {
            return Err(c.length_error(c.pos));
        }
        Ok(DeviceState {
            name: self.name.clone(),
            instance_id: self.instance_id,
            state,
        })
    }
}

impl StructDesc {
    /// The VMSD name (`None` at the top of an old-style section or of a struct field).
    pub fn vmsd_name(&self) -> Option<&str> {
        self.vmsd_name.as_deref()
    }
    /// The version, if the vmdesc gives one.
    pub fn version(&self) -> Option<u32> {
        self.version
    }
    /// The fields in wire order.
    pub fn fields(&self) -> &[FieldDesc] {
        &self.fields
    }
    /// The subsections that were sent, in wire order.
    pub fn subsections(&self) -> &[StructDesc] {
        &self.subsections
    }
    /// Wire length in bytes of the fields and subsections.
    pub fn wire_len(&self) -> u64 {
        self.len
    }
}

impl FieldDesc {
    /// The field name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The vmdesc `"type"`.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }
    /// Bytes per element on the wire (`"size"`).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Single value, array element or compressed array.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// How its bytes are decoded.
    pub fn kind(&self) -> &FieldKind {
        &self.kind
    }
}

struct Cursor<'p, 'd> {
    buf: &'p [u8],
    pos: usize,
    base: u64,
    device: &'d DeviceDesc,
}

impl<'p> Cursor<'p, '_> {
    fn device_name(&self) -> String {
        format!("{} {}", self.device.name, self.device.instance_id)
    }

    fn length_error(&self, at: usize) -> WireError {
        WireError::VmStateLength {
            offset: self.base + at as u64,
            device: self.device_name(),
            expected: self.device.body.len,
            found: self.buf.len() as u64,
        }
    }

    fn mismatch(&self, at: usize, path: &str, why: String) -> WireError {
        WireError::VmStateMismatch {
            offset: self.base + at as u64,
            device: self.device_name(),
            path: path.to_string(),
            why,
        }
    }

    fn take(&mut self, n: u64) -> Result<&'p [u8], WireError> {
        let avail = (self.buf.len() - self.pos) as u64;
        if n > avail {
            return Err(self.length_error(self.buf.len()));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn decode_struct(&mut self, sd: &StructDesc, path: &str) -> Result<StructState, WireError> {
        let mut fields = Vec::with_capacity(sd.fields.len());
        for f in &sd.fields {
            let offset = self.base + self.pos as u64;
            let (count, index) = match f.layout {
                Layout::Single => (1, None),
                Layout::Index(i) => (1, Some(i)),
                Layout::Array(n) => (n, None),
            };
            let mut values = Vec::with_capacity(count.min(1 << 16) as usize);
            for _ in 0..count {
                values.push(self.decode_elem(f, path)?);
            }
            fields.push(FieldState {
                name: f.name.clone(),
                type_name: f.type_name.clone(),
                index,
                offset,
                values,
            });
        }
        let mut subsections = Vec::with_capacity(sd.subsections.len());
        for sub in &sd.subsections {
            let name = sub.vmsd_name.as_deref().unwrap_or("");
            let spath = format!("{path}/subsection {name}");
            let at = self.pos;
            let marker = self.take(1)?[0];
            if marker != SUBSECTION {
                return Err(self.mismatch(
                    at,
                    &spath,
                    format!("expected the subsection marker 0x05, found {marker:#04x}"),
                ));
            }
            let at = self.pos;
            let len = self.take(1)?[0];
            let found = self.take(u64::from(len))?;
            if found != name.as_bytes() {
                return Err(self.mismatch(
                    at,
                    &spath,
                    format!(
                        "subsection name is \"{}\", the vmdesc says \"{name}\"",
                        String::from_utf8_lossy(found).escape_debug()
                    ),
                ));
            }
            let at = self.pos;
            let v = self.take(4)?;
            let version = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            if Some(version) != sub.version {
                return Err(self.mismatch(
                    at,
                    &spath,
                    format!(
                        "subsection version is {version}, the vmdesc says {}",
                        sub.version.unwrap_or(0)
                    ),
                ));
            }
            subsections.push(self.decode_struct(sub, &spath)?);
        }
        Ok(StructState {
            vmsd_name: sd.vmsd_name.clone(),
            version: sd.version,
            fields,
            subsections,
        })
    }

    fn decode_elem(&mut self, f: &FieldDesc, path: &str) -> Result<Value, WireError> {
        let at = self.pos;
        Ok(match &f.kind {
            FieldKind::Struct(sd) => {
                let inner = self.decode_struct(sd, &format!("{path}.{}", f.name))?;
                // The vmdesc was checked to add up; this holds by construction.
                if (self.pos - at) as u64 != f.size {
                    return Err(self.mismatch(
                        at,
                        &format!("{path}.{}", f.name),
                        format!("struct took {} bytes, size is {}", self.pos - at, f.size),
                    ));
                }
                Value::Struct(Box::new(inner))
            }
            FieldKind::Bool => Value::Bool(self.take(1)?[0] != 0),
            FieldKind::Int { signed } => {
                let b = self.take(f.size)?;
                let raw = b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x));
                Value::Int(IntValue {
                    size: b.len() as u8,
                    signed: *signed,
                    raw,
                })
            }
            FieldKind::Nullptr => {
                let b = self.take(1)?[0];
                if b != NULLPTR_MARKER {
                    return Err(self.mismatch(
                        at,
                        &format!("{path}.{}", f.name),
                        format!("NULL pointer marker is {b:#04x}, must be 0x30"),
                    ));
                }
                Value::Nullptr
            }
            FieldKind::Capability => {
                let b = self.take(f.size)?;
                if u64::from(b[0]) + 1 != f.size {
                    return Err(self.mismatch(
                        at,
                        &format!("{path}.{}", f.name),
                        format!(
                            "capability length byte {} in a field of {} bytes",
                            b[0], f.size
                        ),
                    ));
                }
                Value::Capability(String::from_utf8_lossy(&b[1..]).into_owned())
            }
            FieldKind::Bytes => Value::Bytes(self.take(f.size)?.to_vec()),
        })
    }
}

/// Space-separated lower-case hex pairs, as analyze-migration.py prints raw bytes.
pub fn hex_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 3);
    for (i, x) in b.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{x:02x}");
    }
    s
}

impl Value {
    /// One-line text of a scalar (structs give `{...}`).
    pub fn display(&self) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.display(),
            Value::Nullptr => "nullptr".into(),
            Value::Capability(c) => c.clone(),
            Value::Struct(_) => "{...}".into(),
            Value::Bytes(b) => hex_bytes(b),
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Struct(st) => st.serialize(s),
            other => s.serialize_str(&other.display()),
        }
    }
}

/// An entry of the analyze-migration.py-shaped object: the values of one name.
enum Entry<'a> {
    Values(Vec<&'a Value>),
    Sub(&'a StructState),
}

impl StructState {
    /// Groups values by name in first-seen order, as analyze-migration.py
    /// does (array elements and repeated names become a list; a subsection
    /// is keyed by its name).
    fn grouped(&self) -> Vec<(&str, Entry<'_>)> {
        let mut out: Vec<(&str, Entry<'_>)> = Vec::new();
        let mut at: HashMap<&str, usize> = HashMap::new();
        for f in &self.fields {
            for v in &f.values {
                match at.get(&*f.name) {
                    Some(&i) => match &mut out[i].1 {
                        Entry::Values(vs) => vs.push(v),
                        Entry::Sub(_) => out[i].1 = Entry::Values(vec![v]),
                    },
                    None => {
                        at.insert(&f.name, out.len());
                        out.push((&f.name, Entry::Values(vec![v])));
                    }
                }
            }
        }
        for s in &self.subsections {
            let name = s.vmsd_name.as_deref().unwrap_or("");
            match at.get(name) {
                Some(&i) => out[i].1 = Entry::Sub(s),
                None => {
                    at.insert(name, out.len());
                    out.push((name, Entry::Sub(s)));
                }
            }
        }
        out
    }

    /// The first field with this name.
    pub fn field(&self, name: &str) -> Option<&FieldState> {
        self.fields.iter().find(|f| &*f.name == name)
    }

    /// The subsection with this VMSD name.
    pub fn subsection(&self, name: &str) -> Option<&StructState> {
        self.subsections
            .iter()
            .find(|s| s.vmsd_name.as_deref() == Some(name))
    }

    fn write_text(&self, out: &mut String, depth: usize) {
        let pad = "  ".repeat(depth);
        for f in &self.fields {
            let many = f.values.len() > 1;
            for (i, v) in f.values.iter().enumerate() {
                let name = match (f.index, many) {
                    (Some(ix), _) => format!("{}[{ix}]", f.name),
                    (None, true) => format!("{}[{i}]", f.name),
                    (None, false) => f.name.to_string(),
                };
                match v {
                    Value::Struct(st) => {
                        let _ = writeln!(out, "{pad}{name}: ({})", f.type_name);
                        st.write_text(out, depth + 1);
                    }
                    v => {
                        let _ = writeln!(out, "{pad}{name} = {} ({})", v.display(), f.type_name);
                    }
                }
            }
        }
        for s in &self.subsections {
            let _ = writeln!(
                out,
                "{pad}subsection {} version {}:",
                s.vmsd_name.as_deref().unwrap_or("?"),
                s.version.unwrap_or(0)
            );
            s.write_text(out, depth + 1);
        }
    }
}

impl Serialize for StructState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let g = self.grouped();
        let mut m = s.serialize_map(Some(g.len()))?;
        for (k, e) in &g {
            match e {
                Entry::Values(vs) if vs.len() == 1 => m.serialize_entry(k, vs[0])?,
                Entry::Values(vs) => m.serialize_entry(k, &List(vs))?,
                Entry::Sub(st) => m.serialize_entry(k, st)?,
            }
        }
        m.end()
    }
}

struct List<'a, 'b>(&'a [&'b Value]);

impl Serialize for List<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut q = s.serialize_seq(Some(self.0.len()))?;
        for v in self.0 {
            q.serialize_element(v)?;
        }
        q.end()
    }
}

impl Serialize for DeviceState {
    /// The device's object as `analyze-migration.py -d state` prints it.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.state.serialize(s)
    }
}

impl DeviceState {
    /// A readable listing: one line per value (`name = value (type)`),
    /// array elements as `name[i]`, structs and subsections indented.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.state.write_text(&mut out, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;

    fn field(name: &str, ty: &str, size: u64) -> Json {
        serde_json::json!({"name": name, "type": ty, "size": size})
    }

    fn desc(devices: Json) -> VmDesc {
        let j = serde_json::json!({"page_size": 4096, "devices": devices});
        VmDesc::parse(j.to_string().as_bytes()).unwrap()
    }

    fn sub_header(name: &str, version: u32) -> Vec<u8> {
        let mut v = vec![SUBSECTION, name.len() as u8];
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&version.to_be_bytes());
        v
    }

    /// A device with ints, an array, a struct array, a buffer and a
    /// subsection holding a nested subsection.
    fn sample() -> (VmDesc, Vec<u8>) {
        let seg = serde_json::json!({"vmsd_name": "seg", "version": 1,
            "fields": [field("sel", "uint32", 4), field("flags", "int16", 2)]});
        let d = desc(serde_json::json!([{
            "name": "dev", "instance_id": 3, "vmsd_name": "dev", "version": 7,
            "fields": [
                field("b", "bool", 1),
                field("s8", "int8", 1),
                {"name": "regs", "array_len": 3, "type": "uint16", "size": 2},
                {"name": "segs", "array_len": 2, "type": "struct", "struct": seg, "size": 6},
                field("le", "int32 le", 4),
                field("buf", "buffer", 5),
                field("odd", "pci config", 3),
            ],
            "subsections": [{"vmsd_name": "dev/a", "version": 2,
                "fields": [field("x", "uint64", 8)],
                "subsections": [{"vmsd_name": "dev/a/b", "version": 9,
                    "fields": [field("y", "uint8", 1)]}]}]
        }]));
        let mut p = vec![1, 0xfe];
        p.extend_from_slice(&[0, 1, 0, 2, 0xff, 0xff]);
        p.extend_from_slice(&[0, 0, 0, 8, 0xff, 0xfe, 0, 0, 0, 9, 0, 1]);
        p.extend_from_slice(&[0, 0, 0, 5]);
        p.extend_from_slice(b"\x7e\0\0\0\x02");
        p.extend_from_slice(&[1, 2, 3]);
        p.extend(sub_header("dev/a", 2));
        p.extend_from_slice(&0x1122334455667788u64.to_be_bytes());
        p.extend(sub_header("dev/a/b", 9));
        p.push(0x80);
        (d, p)
    }

    #[test]
    fn decodes_every_kind() {
        let (d, p) = sample();
        let dev = d.device("dev", 3).unwrap();
        assert_eq!(dev.payload_len(), p.len() as u64);
        assert_eq!(dev.version(), 7);
        let st = dev.decode(&p, 1000).unwrap();
        let j = serde_json::to_value(&st).unwrap();
        assert_eq!(j["b"], Json::Bool(true));
        assert_eq!(j["s8"], "0xfe (-2)");
        assert_eq!(j["regs"], serde_json::json!(["0x0001", "0x0002", "0xffff"]));
        assert_eq!(j["segs"][0]["sel"], "0x00000008");
        assert_eq!(j["segs"][0]["flags"], "0xfffe (-2)");
        assert_eq!(j["segs"][1]["flags"], "0x0001");
        assert_eq!(j["le"], "0x00000005");
        assert_eq!(j["buf"], "7e 00 00 00 02");
        assert_eq!(j["odd"], "01 02 03");
        assert_eq!(j["dev/a"]["x"], "0x1122334455667788");
        assert_eq!(j["dev/a"]["dev/a/b"]["y"], "0x80");
        // Offsets are absolute.
        assert_eq!(st.state.field("buf").unwrap().offset, 1000 + 24);
        let text = st.to_text();
        assert!(text.contains("regs[2] = 0xffff (uint16)"), "{text}");
        assert!(text.contains("subsection dev/a version 2:"), "{text}");
    }

    #[test]
    fn key_order_follows_the_wire() {
        let (d, p) = sample();
        let st = d.device("dev", 3).unwrap().decode(&p, 0).unwrap();
        let s = serde_json::to_string(&st).unwrap();
        let keys = [
            "\"b\"",
            "\"s8\"",
            "\"regs\"",
            "\"segs\"",
            "\"le\"",
            "\"buf\"",
            "\"odd\"",
            "\"dev/a\"",
        ];
        let pos: Vec<usize> = keys.iter().map(|k| s.find(k).unwrap()).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{s}");
    }

    #[test]
    fn subsection_mismatches_are_errors_with_offsets() {
        let (d, p) = sample();
        let dev = d.device("dev", 3).unwrap();
        let sub_at = 2 + 6 + 12 + 4 + 5 + 3;
        // marker
        let mut q = p.clone();
        q[sub_at] = 0x7e;
        match dev.decode(&q, 100) {
            Err(WireError::VmStateMismatch { offset, .. }) => {
                assert_eq!(offset, 100 + sub_at as u64)
            }
            r => panic!("{r:?}"),
        }
        // name
        let mut q = p.clone();
        q[sub_at + 2] = b'X';
        match dev.decode(&q, 100) {
            Err(WireError::VmStateMismatch { offset, why, .. }) => {
                assert_eq!(offset, 100 + sub_at as u64 + 1);
                assert!(why.contains("Xev/a"), "{why}");
            }
            r => panic!("{r:?}"),
        }
        // version
        let mut q = p.clone();
        q[sub_at + 2 + 5 + 3] = 3;
        assert!(matches!(
            dev.decode(&q, 0),
            Err(WireError::VmStateMismatch { offset, .. }) if offset == sub_at as u64 + 7
        ));
    }

    #[test]
    fn payload_must_be_consumed_exactly() {
        let (d, p) = sample();
        let dev = d.device("dev", 3).unwrap();
        let mut longer = p.clone();
        longer.push(0);
        match dev.decode(&longer, 10) {
            Err(WireError::VmStateLength {
                offset,
                expected,
                found,
                ..
            }) => {
                assert_eq!(
                    (offset, expected, found),
                    (10 + p.len() as u64, p.len() as u64, p.len() as u64 + 1)
                );
            }
            r => panic!("{r:?}"),
        }
        for cut in 0..p.len() {
            let e = dev.decode(&p[..cut], 10).unwrap_err();
            assert!(
                matches!(
                    e,
                    WireError::VmStateLength { .. } | WireError::VmStateMismatch { .. }
                ),
                "{cut}: {e:?}"
            );
            assert!(e.offset() <= 10 + cut as u64);
        }
    }

    #[test]
    fn old_style_section() {
        let d = desc(
            serde_json::json!([{"name": "slirp", "instance_id": 0, "size": 4,
            "fields": [{"name": "data", "type": "buffer", "size": 4}]}]),
        );
        let dev = d.device("slirp", 0).unwrap();
        assert_eq!(dev.payload_len(), 4);
        assert_eq!(dev.vmsd_name(), None);
        let st = dev.decode(&[1, 2, 3, 4], 0).unwrap();
        assert_eq!(serde_json::to_value(&st).unwrap()["data"], "01 02 03 04");
    }

    #[test]
    fn index_fields_and_nullptr_group_like_analyze_migration() {
        let d = desc(
            serde_json::json!([{"name": "p", "instance_id": 0, "vmsd_name": "p", "version": 1,
            "fields": [
                {"name": "ptrs", "index": 0, "type": "uint8", "size": 1},
                {"name": "ptrs", "index": 1, "type": "nullptr", "size": 1},
                {"name": "one", "array_len": 1, "type": "uint8", "size": 1},
            ]}]),
        );
        let dev = d.device("p", 0).unwrap();
        let st = dev.decode(&[7, b'0', 9], 0).unwrap();
        let j = serde_json::to_value(&st).unwrap();
        assert_eq!(j["ptrs"], serde_json::json!(["0x07", "nullptr"]));
        assert_eq!(j["one"], "0x09");
        assert!(matches!(
            dev.decode(&[7, 0, 9], 0),
            Err(WireError::VmStateMismatch { offset: 1, .. })
        ));
    }

    #[test]
    fn rejects_bad_descriptions() {
        let cases: Vec<String> = vec![
            "not json".into(),
            "{\"devices\": 3}".into(),
            "{\"devices\": [{\"name\": \"x\", \"instance_id\": 0}]}".into(),
            "{\"devices\": [{\"name\": \"x\", \"instance_id\": 0, \"fields\": [{\"name\": \"a\", \"type\": \"uint8\"}]}]}".into(),
            "{\"devices\": [{\"name\": \"x\", \"instance_id\": 0, \"fields\": [{\"name\": \"a\", \"type\": \"struct\", \"size\": 1}]}]}".into(),
            "{\"devices\": [{\"name\": \"x\", \"instance_id\": 0, \"fields\": [{\"name\": \"a\", \"type\": \"uint8\", \"size\": 1, \"array_len\": 0}]}]}".into(),
            // struct size disagreeing with its fields
            "{\"devices\": [{\"name\": \"x\", \"instance_id\": 0, \"fields\": [{\"name\": \"a\", \"type\": \"struct\", \"size\": 3, \"struct\": {\"fields\": [{\"name\": \"b\", \"type\": \"uint8\", \"size\": 1}]}}]}]}".into(),
            // overflow
            format!("{{\"devices\": [{{\"name\": \"x\", \"instance_id\": 0, \"fields\": [{{\"name\": \"a\", \"type\": \"buffer\", \"size\": {}, \"array_len\": 4}}]}}]}}", u64::MAX / 2),
            // too many decoded values
            "{\"devices\": [{\"name\": \"x\", \"instance_id\": 0, \"fields\": [{\"name\": \"a\", \"type\": \"struct\", \"size\": 0, \"array_len\": 4000000000, \"struct\": {\"fields\": []}}]}]}".into(),
            // duplicate device
            "{\"devices\": [{\"name\": \"x\", \"instance_id\": 0, \"fields\": []}, {\"name\": \"x\", \"instance_id\": 0, \"fields\": []}]}".into(),
            // subsection name too long for its u8 length
            format!("{{\"devices\": [{{\"name\": \"x\", \"instance_id\": 0, \"fields\": [], \"subsections\": [{{\"vmsd_name\": \"{}\", \"version\": 1, \"fields\": []}}]}}]}}", "n".repeat(256)),
        ];
        for c in &cases {
            assert!(
                matches!(VmDesc::parse(c.as_bytes()), Err(WireError::Vmdesc { .. })),
                "{c}"
            );
        }
        let five: Vec<String> = (0..5)
            .map(|i| format!("{{\"name\": \"x\", \"instance_id\": {i}, \"fields\": [{{\"name\": \"a\", \"type\": \"b\", \"size\": 0, \"array_len\": 999999}}]}}"))
            .collect();
        let j = format!("{{\"devices\": [{}]}}", five.join(","));
        match VmDesc::parse(j.as_bytes()) {
            Err(WireError::Vmdesc { why, .. }) => {
                assert!(why.contains("more than 4000000"), "{why}")
            }
            r => panic!("{r:?}"),
        }
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        match VmDesc::parse(deep.as_bytes()) {
            Err(WireError::Vmdesc { offset, .. }) => assert_eq!(offset, MAX_JSON_DEPTH as u64),
            r => panic!("{r:?}"),
        }
        let many = format!("[{}{{}}]", "{},".repeat(MAX_OBJECTS));
        assert!(matches!(
            VmDesc::parse(many.as_bytes()),
            Err(WireError::Vmdesc { .. })
        ));
    }

    #[test]
    fn inline_descriptions_of_tmp_and_qtailq_fields_are_skipped() {
        // VMSTATE_WITH_TMP / qtailq write vmsd_name, version and fields into
        // the field object itself, once per element (duplicate keys).
        let j = br#"{"devices": [{"name": "d", "instance_id": 0, "vmsd_name": "d", "version": 1,
            "fields": [{"name": "tmp", "type": "tmp", "vmsd_name": "t", "version": 0,
                "fields": [{"name": "a", "type": "uint16", "size": 2}],
                "vmsd_name": "t", "version": 0, "fields": [{"bogus": true}], "size": 2},
              {"name": "q", "type": "qtailq", "size": 3, "unknown_key": [1, {"x": 2}]}]}]}"#;
        let d = VmDesc::parse(j).unwrap();
        let dev = d.device("d", 0).unwrap();
        assert_eq!(dev.payload_len(), 5);
        let st = dev.decode(&[1, 2, 3, 4, 5], 0).unwrap();
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["tmp"], "01 02");
        assert_eq!(v["q"], "03 04 05");
    }

    #[test]
    fn errors_name_the_entry_and_point_after_it() {
        let j = br#"{"devices": [{"name": "cpu", "instance_id": 0, "fields": [{"name": "a", "type": "uint8", "size": 1}, {"name": "regs", "type": "uint8"}]}]}"#;
        match VmDesc::parse(j) {
            Err(WireError::Vmdesc { offset, why }) => {
                assert!(
                    why.contains("devices[0] (cpu).fields[1] (regs): missing \"size\""),
                    "{why}"
                );
                let at = j.windows(6).position(|w| w == b"\"regs\"").unwrap() as u64;
                assert!(offset > at && offset <= j.len() as u64, "{offset}");
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn json_syntax_error_offset_points_into_the_input() {
        let j = b"{\"devices\": [\n  {\"name\": x}]}";
        match VmDesc::parse(j) {
            Err(WireError::Vmdesc { offset, .. }) => assert_eq!(j[offset as usize], b'x'),
            r => panic!("{r:?}"),
        }
    }
}
