//! config.json: architecture, sizes, GQA ratios, RoPE scaling. A config that parses must give
//! consistent tensor shapes and finite RoPE frequencies without overflowing.
#![no_main]
use compress::model::ModelConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(c) = ModelConfig::from_value(v, Path::new("config.json")) {
        let _ = c.num_params();
        let _ = c.expected_tensors();
        let _ = c.rope_inv_freq();
    }
});
