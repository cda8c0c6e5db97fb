//! A sharded checkpoint's model.safetensors.index.json: every accepted shard name must stay
//! inside the model folder.
#![no_main]
use compress::model::checkpoint::parse_index;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = parse_index(data, Path::new("model.safetensors.index.json")) {
        for f in map.values() {
            assert!(!f.is_empty() && !f.contains('/') && !f.contains(".."));
        }
    }
});
