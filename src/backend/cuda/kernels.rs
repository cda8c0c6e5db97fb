//! The kernels' CUDA C sources and their compilation: NVRTC options, the on-disk PTX cache
//! keyed by source, options and architecture, and the target architecture of a device.

use super::nvrtc;
use anyhow::{bail, Result};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::path::PathBuf;

/// Kernel sources, embedded so the binary is self-contained.
pub const QUANT_CU: &str = include_str!("../../../kernels/quant.cu");
pub const UTIL_CU: &str = include_str!("../../../kernels/util.cu");
pub const LAYER_CU: &str = include_str!("../../../kernels/layer.cu");

/// The NVRTC options every kernel is built with: no FMA contraction, IEEE division and square
/// root, no flush to zero — each f32 operation rounds once, in the order written, like the CPU.
fn options(arch: &'static str) -> CompileOptions {
    CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(false),
        arch: Some(arch),
        ..Default::default()
    }
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("COMPRESS_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("compress/ptx"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/compress/ptx"))
}

/// Compile `src` for `arch` with NVRTC, or read the cached PTX. Needs libnvrtc, not a GPU.
pub fn compile(name: &str, src: &str, arch: &'static str) -> Result<Ptx> {
    use sha2::{Digest, Sha256};
    let opts = options(arch);
    let key = {
        let mut h = Sha256::new();
        h.update(src.as_bytes());
        h.update(format!("{:?}", opts.clone().build_for_key()).as_bytes());
        h.update(arch.as_bytes());
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let cached = cache_dir().map(|d| d.join(format!("{name}-{}.ptx", &key[..16])));
    if let Some(p) = &cached {
        if let Ok(s) = std::fs::read_to_string(p) {
            return Ok(Ptx::from_src(s));
        }
    }
    let ptx = nvrtc::compile(src, &opts.clone().build_for_key_flags(), name)?;
    if let Some(p) = &cached {
        // Best effort: a cache that cannot be written only costs a recompile next time.
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, ptx.to_src()).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
    Ok(ptx)
}

/// `CompileOptions` as NVRTC flags (also the cache key).
trait KeyFlags {
    fn build_for_key(self) -> Vec<String>;
    fn build_for_key_flags(self) -> Vec<String>;
}
impl KeyFlags for CompileOptions {
    fn build_for_key(self) -> Vec<String> {
        self.build_for_key_flags()
    }
    fn build_for_key_flags(self) -> Vec<String> {
        let b = |n: &str, v: Option<bool>| v.map(|v| format!("--{n}={v}"));
        [
            b("ftz", self.ftz),
            b("prec-sqrt", self.prec_sqrt),
            b("prec-div", self.prec_div),
            b("fmad", self.fmad),
            self.arch.map(|a| format!("--gpu-architecture={a}")),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// The virtual architecture NVRTC targets for a compute capability (PTX is JIT-compiled by the
/// driver for the exact chip). bf16 conversions need compute_80 or newer.
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (9, _) => "compute_90",
        (8, 9) => "compute_89",
        (8, 7) => "compute_87",
        (8, 6) => "compute_86",
        (8, 0) => "compute_80",
        (m, _) if m >= 10 => "compute_90",
        (m, n) => bail!("compute capability {m}.{n} is below 8.0 (bf16 kernels need sm_80+)"),
    })
}
