//! The safetensors header reader: length prefix, JSON header, dtypes, shapes and offsets
//! checked against the file length. Any input must give Ok or Err, never a panic or a huge
//! allocation (the header size is capped before anything is allocated).
#![no_main]
use compress::safetensors_file::{parse_header, to_f32};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok((tensors, _meta)) = parse_header(data, Path::new("fuzz.safetensors")) {
        // Offsets that validated must be in bounds and agree with dtype × shape.
        for info in tensors.values() {
            let bytes = &data[info.start..info.end];
            assert_eq!(bytes.len(), info.numel() * info.dtype.size());
            if info.dtype.is_float() {
                let v = to_f32(info.dtype, bytes).expect("float dtype converts");
                assert_eq!(v.len(), info.numel());
            }
        }
    }
});
