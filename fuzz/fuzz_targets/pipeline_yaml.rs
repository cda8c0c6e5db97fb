//! The pipeline YAML: schema (unknown keys refused), value checks, and building every pass.
#![no_main]
use compress::pipeline::Pipeline;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = Pipeline::from_str(text, Path::new("fuzz.yaml")) {
        for s in &p.passes {
            let _ = s.build();
        }
    }
});
