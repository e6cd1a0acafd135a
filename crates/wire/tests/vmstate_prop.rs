//! Property tests for the vmdesc-driven VMState decoder: guest bytes inside a
//! buffer (any pattern, including copies of section footers, section
//! headers, EOF and subsection markers) are read back exactly and never
//! change where the payload ends; scalar fields encoded big-endian decode to
//! their values; no payload or cut makes the decoder panic.

use proptest::prelude::*;
use qmig_wire::vmstate::{Value, VmDesc};
use qmig_wire::WireError;
use serde_json::json;

/// Byte chunks a hostile guest would plant: footers, FULL/START headers,
/// EOF + vmdesc, subsection headers, RAM flags, or anything.
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        any::<u32>().prop_map(|id| {
            let mut v = vec![0x7e];
            v.extend_from_slice(&id.to_be_bytes());
            v
        }),
        (
            any::<u32>(),
            "[a-z0-9/:._]{1,20}",
            any::<u32>(),
            any::<u32>(),
            0x01u8..=0x04
        )
            .prop_map(|(id, name, inst, ver, kind)| {
                let mut v = vec![kind];
                v.extend_from_slice(&id.to_be_bytes());
                v.push(name.len() as u8);
                v.extend_from_slice(name.as_bytes());
                v.extend_from_slice(&inst.to_be_bytes());
                v.extend_from_slice(&ver.to_be_bytes());
                v
            }),
        Just(b"\x00\x06\x00\x00\x00\x02{}".to_vec()),
        Just(b"\x05\x05dev/s\x00\x00\x00\x01".to_vec()),
        Just(0x0000_0000_0000_7010u64.to_be_bytes().to_vec()),
    ]
}

fn guest_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(chunk(), 0..12).prop_map(|cs| cs.concat())
}

fn device_with_buffer(len: usize) -> VmDesc {
    let j = json!({"page_size": 4096, "devices": [{
        "name": "mc146818rtc", "instance_id": 0, "vmsd_name": "mc146818rtc", "version": 3,
        "fields": [
            {"name": "cmos_data", "type": "buffer", "size": len},
            {"name": "cmos_index", "type": "uint8", "size": 1},
        ],
        "subsections": [{"vmsd_name": "dev/s", "version": 1,
            "fields": [{"name": "x", "type": "uint16", "size": 2}]}]
    }]});
    VmDesc::parse(j.to_string().as_bytes()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn buffer_bytes_are_read_exactly(buf in guest_bytes(), idx: u8, x: u16, tail in guest_bytes()) {
        let d = device_with_buffer(buf.len());
        let dev = d.device("mc146818rtc", 0).unwrap();
        let mut p = buf.clone();
        p.push(idx);
        p.extend_from_slice(b"\x05\x05dev/s\x00\x00\x00\x01");
        p.extend_from_slice(&x.to_be_bytes());
        prop_assert_eq!(dev.payload_len(), p.len() as u64);
        let st = dev.decode(&p, 7).unwrap();
        prop_assert_eq!(&st.state.fields[0].values[0], &Value::Bytes(buf.clone()));
        match &st.state.fields[1].values[0] {
            Value::Int(i) => prop_assert_eq!(i.raw, u64::from(idx)),
            v => prop_assert!(false, "{:?}", v),
        }
        match &st.state.subsections[0].fields[0].values[0] {
            Value::Int(i) => prop_assert_eq!(i.raw, u64::from(x)),
            v => prop_assert!(false, "{:?}", v),
        }
        // Whatever follows the payload is not part of it.
        let mut longer = p.clone();
        longer.extend_from_slice(&tail);
        let r = dev.decode(&longer, 7);
        if tail.is_empty() {
            prop_assert!(r.is_ok());
        } else {
            let is_len_err = matches!(r, Err(WireError::VmStateLength { offset, .. }) if offset == 7 + p.len() as u64);
            prop_assert!(is_len_err);
        }
    }

    #[test]
    fn scalars_decode_to_their_values(vals in prop::collection::vec((0usize..10, any::<u64>()), 0..40)) {
        const TYPES: [(&str, usize, bool); 10] = [
            ("int8", 1, true), ("int16", 2, true), ("int32", 4, true), ("int64", 8, true),
            ("int32 le", 4, true), ("uint8", 1, false), ("uint16", 2, false),
            ("uint32", 4, false), ("uint64", 8, false), ("bool", 1, false),
        ];
        let fields: Vec<_> = vals.iter().enumerate().map(|(i, (t, _))| {
            let (ty, size, _) = TYPES[*t];
            json!({"name": format!("f{i}"), "type": ty, "size": size})
        }).collect();
        let j = json!({"devices": [{"name": "d", "instance_id": 1, "vmsd_name": "d", "version": 1, "fields": fields}]});
        let d = VmDesc::parse(j.to_string().as_bytes()).unwrap();
        let mut p = Vec::new();
        for (t, v) in &vals {
            let (ty, size, _) = TYPES[*t];
            if ty == "bool" {
                p.push(u8::from(v & 1 == 1));
            } else {
                p.extend_from_slice(&v.to_be_bytes()[8 - size..]);
            }
        }
        let st = d.device("d", 1).unwrap().decode(&p, 0).unwrap();
        for ((t, v), f) in vals.iter().zip(&st.state.fields) {
            let (ty, size, signed) = TYPES[*t];
            let mask = if size == 8 { u64::MAX } else { (1u64 << (8 * size)) - 1 };
            match &f.values[0] {
                Value::Bool(b) => prop_assert_eq!(*b, v & 1 == 1),
                Value::Int(i) => {
                    prop_assert_eq!(i.raw, v & mask);
                    prop_assert_eq!(i.signed, signed);
                    let sext = (((v & mask) << (64 - 8 * size)) as i64) >> (64 - 8 * size);
                    prop_assert_eq!(i.as_i64(), sext);
                    prop_assert_eq!(i.display().len() >= 2 + 2 * size, true);
                }
                other => prop_assert!(false, "{}: {:?}", ty, other),
            }
        }
    }

    #[test]
    fn any_payload_is_decoded_or_refused_with_an_offset_inside(p in prop::collection::vec(any::<u8>(), 0..200), base in 0u64..1 << 40) {
        let d = device_with_buffer(17);
        let dev = d.device("mc146818rtc", 0).unwrap();
        match dev.decode(&p, base) {
            Ok(_) => prop_assert_eq!(p.len() as u64, dev.payload_len()),
            Err(e) => {
                prop_assert!(e.offset() >= base && e.offset() <= base + p.len() as u64, "{}", e);
            }
        }
    }
}
