//! A memory-mapped safetensors file with a strictly validated header.
//!
//! We parse the header ourselves (rather than trusting it) so that every lie a file can tell —
//! truncated data, offsets past the end, overlapping tensors, a byte count that disagrees with
//! dtype × shape, an absurd header length — becomes one error naming the file and the tensor.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Refuse headers above this size: a hostile file must not make us allocate gigabytes.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    /// OCP FP8 E4M3 ("float8_e4m3fn"): FP8 weights and NVFP4's scales.
    F8E4M3,
    /// OCP FP8 E5M2.
    F8E5M2,
    /// E8M0 power-of-two scales (safetensors 0.6's `F8_E8M0`).
    F8E8M0,
}

impl DType {
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "BOOL" => DType::Bool,
            "U8" => DType::U8,
            "I8" => DType::I8,
            "I16" => DType::I16,
            "I32" => DType::I32,
            "I64" => DType::I64,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E5M2" => DType::F8E5M2,
            "F8_E8M0" => DType::F8E8M0,
            _ => return None,
        })
    }
    pub fn name(&self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E8M0 => "F8_E8M0",
        }
    }
    pub fn size(&self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::F8E4M3 | DType::F8E5M2 | DType::F8E8M0 => 1,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }
    /// A dense floating-point dtype (the 8-bit float codes are not: they need their scales).
    pub fn is_float(&self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// The small float format of an 8-bit float dtype.
    pub fn float8(&self) -> Option<crate::number::FloatFormat> {
        use crate::number::FloatFormat;
        match self {
            DType::F8E4M3 => Some(FloatFormat::E4M3),
            DType::F8E5M2 => Some(FloatFormat::E5M2),
            DType::F8E8M0 => Some(FloatFormat::E8M0),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range inside the file (absolute, header included).
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    /// Built in memory (anonymous mapping): `release` must not discard its pages, which
    /// would zero them.
    in_memory: bool,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

/// Parse and validate a safetensors header against the total file length.
/// Returns (tensors with absolute offsets, metadata). Pure function: the fuzz target calls it.
pub fn parse_header(
    bytes: &[u8],
    file: &Path,
) -> Result<(BTreeMap<String, TensorInfo>, BTreeMap<String, String>)> {
    let f = file.display();
    if bytes.len() < 8 {
        bail!(
            "{f}: not a safetensors file (only {} bytes; truncated?)",
            bytes.len()
        );
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES {
        bail!("{f}: safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES}); corrupt or hostile file");
    }
    let n = n as usize;
    if 8 + n > bytes.len() {
        bail!(
            "{f}: truncated: header claims {n} bytes but the file has only {} after the length prefix",
            bytes.len() - 8
        );
    }
    let header: Value = serde_json::from_slice(&bytes[8..8 + n])
        .with_context(|| format!("{f}: safetensors header is not valid JSON"))?;
    let obj = header
        .as_object()
        .with_context(|| format!("{f}: safetensors header is not a JSON object"))?;
    let data_start = 8 + n;
    let data_len = bytes.len() - data_start;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, val) in m {
                    if let Some(s) = val.as_str() {
                        metadata.insert(k.clone(), s.to_string());
                    }
                }
            }
            continue;
        }
        let dtype_s = v
            .get("dtype")
            .and_then(|d| d.as_str())
            .with_context(|| format!("{f}: tensor `{name}`: missing `dtype`"))?;
        let dtype = DType::parse(dtype_s)
            .with_context(|| format!("{f}: tensor `{name}`: unsupported dtype `{dtype_s}`"))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .with_context(|| format!("{f}: tensor `{name}`: missing `shape`"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .with_context(|| {
                format!("{f}: tensor `{name}`: `shape` must hold non-negative integers")
            })?;
        let offs = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .with_context(|| {
                format!("{f}: tensor `{name}`: `data_offsets` must be [begin, end]")
            })?;
        let (b, e) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(b), Some(e)) => (b as usize, e as usize),
            _ => bail!("{f}: tensor `{name}`: `data_offsets` must be integers"),
        };
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .with_context(|| format!("{f}: tensor `{name}`: shape {shape:?} overflows"))?;
        let want = numel
            .checked_mul(dtype.size())
            .with_context(|| format!("{f}: tensor `{name}`: size overflows"))?;
        if b > e || e - b != want {
            bail!(
                "{f}: tensor `{name}`: data_offsets [{b}, {e}] hold {} bytes but {dtype_s} {shape:?} needs {want}",
                e.saturating_sub(b)
            );
        }
        if e > data_len {
            bail!(
                "{f}: tensor `{name}`: data ends at byte {e} but the file holds only {data_len} data bytes (truncated?)"
            );
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                start: data_start + b,
                end: data_start + e,
            },
        );
    }
    // Overlapping tensors mean the header lies.
    let mut ranges: Vec<(usize, usize, &String)> =
        tensors.iter().map(|(k, t)| (t.start, t.end, k)).collect();
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            bail!(
                "{f}: tensors `{}` and `{}` overlap in the data section",
                w[0].2,
                w[1].2
            );
        }
    }
    Ok((tensors, metadata))
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is opened read-only; we never write through the mapping. A file
        // changed under us by another process is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (tensors, metadata) = parse_header(&mmap, path)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            in_memory: false,
            tensors,
            metadata,
        })
    }

    /// A safetensors image built in memory (a GGUF file dequantized for evaluation), held in an
    /// anonymous mapping; `path` names the file it came from.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).with_context(|| {
            format!(
                "cannot allocate {} bytes for {}",
                bytes.len(),
                path.display()
            )
        })?;
        m[..bytes.len()].copy_from_slice(bytes);
        let mmap = m
            .make_read_only()
            .with_context(|| format!("cannot map {}", path.display()))?;
        let (tensors, metadata) = parse_header(&mmap[..bytes.len()], path)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            in_memory: true,
            tensors,
            metadata,
        })
    }

    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.end]
    }

    /// Drop this tensor's pages from our resident set (the page cache keeps them). Streaming
    /// calls this after each layer so peak RSS stays near one layer, not the whole file.
    pub fn release(&self, info: &TensorInfo) {
        if self.in_memory {
            return;
        }
        let page = 4096;
        let start = info.start.div_ceil(page) * page;
        let end = (info.end / page) * page;
        if end > start {
            // SAFETY: MADV_DONTNEED on a private read-only file mapping only discards our page
            // table entries; later reads fault the (unchanged) file contents back in. No slice
            // into this range outlives the call site's use (callers copy what they keep).
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

/// Convert raw little-endian floating-point bytes to f32.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        d => match d.float8() {
            Some(f) => bytes.iter().map(|b| f.decode(*b)).collect(),
            None => return None,
        },
    })
}

/// Encode f32 values in a floating-point storage dtype (round-to-nearest-even).
pub fn from_f32(dtype: DType, v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * dtype.size());
    match dtype {
        DType::BF16 => v
            .iter()
            .for_each(|x| out.extend_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes())),
        DType::F16 => v
            .iter()
            .for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes())),
        DType::F64 => v
            .iter()
            .for_each(|x| out.extend_from_slice(&(*x as f64).to_le_bytes())),
        d if d.float8().is_some() => {
            let f = d.float8().expect("an 8-bit float");
            out.extend(v.iter().map(|x| f.encode(*x)))
        }
        _ => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    out
}

/// Decode little-endian integer bytes (I8/U8/I16/I32/I64) to i64.
pub fn to_i64(dtype: DType, bytes: &[u8]) -> Option<Vec<i64>> {
    Some(match dtype {
        DType::I8 => bytes.iter().map(|b| *b as i8 as i64).collect(),
        DType::U8 | DType::Bool => bytes.iter().map(|b| *b as i64).collect(),
        DType::I16 => bytes
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        DType::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        DType::I64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                i64::from_le_bytes(a)
            })
            .collect(),
        _ => return None,
    })
}
