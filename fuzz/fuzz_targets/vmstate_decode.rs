//! A vmdesc JSON and a device payload, split at the first NUL byte (JSON
//! text never holds one): the vmdesc parses or is refused; every device
//! decodes the payload or refuses it with an offset inside it; a decoded
//! payload has exactly `payload_len` bytes and its JSON rendering works.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_wire::VmDesc;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (json, payload) = (&data[..split], data.get(split + 1..).unwrap_or(&[]));
    let desc = match VmDesc::parse(json) {
        Ok(d) => d,
        Err(e) => {
            assert!(e.offset() <= json.len() as u64);
            return;
        }
    };
    for dev in desc.devices() {
        assert!(std::ptr::eq(
            desc.device(dev.name(), dev.instance_id()).unwrap(),
            dev
        ));
        match dev.decode(payload, 1000) {
            Ok(st) => {
                assert_eq!(payload.len() as u64, dev.payload_len());
                let _ = serde_json::to_vec(&st).unwrap();
                let _ = st.to_text();
            }
            Err(e) => {
                assert!(e.offset() >= 1000 && e.offset() <= 1000 + payload.len() as u64);
            }
        }
    }
});
