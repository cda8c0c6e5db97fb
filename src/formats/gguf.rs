//! GGUF v3, the file llama.cpp (and Ollama, LM Studio) loads: the container (writer and a
//! strict reader), the metadata llama.cpp needs for the Llama family, the tokenizer from
//! tokenizer.json, tensor names and layouts as llama.cpp's converter writes them, and the
//! per-tensor type choice of llama.cpp's quantization mixes.
//!
//! References (llama.cpp, as vendored in the llama-cpp-python 0.3.36 sdist):
//! * container: `gguf-py/gguf/gguf_writer.py`, `ggml/src/gguf.cpp` — magic `GGUF`, version 3,
//!   tensor count and KV count (u64), KV pairs (string key, u32 value type, value), tensor infos
//!   (name, n_dims u32, ne[0..n] u64 with ne[0] the contiguous dimension, ggml type u32, data
//!   offset u64 relative to the data section), padding to `general.alignment` (32), data with
//!   every tensor aligned to 32;
//! * metadata and tokenizer: `conversion/base.py` (`set_gguf_parameters`, `get_vocab_base`,
//!   `_set_vocab_gpt2`), `conversion/llama.py`, `gguf-py/gguf/vocab.py` (`SpecialVocab`);
//! * tensor names: `gguf-py/gguf/tensor_mapping.py` / `constants.py` (`token_embd`,
//!   `blk.N.attn_q`, …, `output_norm`, `output`);
//! * Q/K row permutation: `LlamaModel.permute` in `conversion/llama.py` (HF's rotate-half RoPE
//!   layout → GGML's interleaved pairs): rows of each head are reordered from
//!   [2, head_dim/2] to [head_dim/2, 2];
//! * type mixes: `src/llama-quant.cpp` `llama_tensor_get_type_impl` and `tensor_type_fallback`
//!   (the table is in README.md, "GGUF export").
//!
//! Pure functions over bytes and values: the exporter (`crate::export`) decides which tensors
//! go in, with which values; nothing here runs a calibration algorithm. Encoding a tensor on
//! its grid is `crate::quant::ggml` (llama.cpp's reference encoders).

use crate::config::{Arch, ModelConfig};
use crate::quant::ggml::GgmlType;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const ALIGNMENT: usize = 32;
/// `GGML_QNT_VERSION`, written by llama-quantize as `general.quantization_version`.
pub const QUANTIZATION_VERSION: u32 = 2;
/// The name of the file we write in the output folder.
pub const FILE_NAME: &str = "model.gguf";

// ------------------------------------------------------------------------------ values

/// A metadata value (`enum gguf_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and elements (all of that type).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => T_U8,
            Value::I8(_) => T_I8,
            Value::U16(_) => T_U16,
            Value::I16(_) => T_I16,
            Value::U32(_) => T_U32,
            Value::I32(_) => T_I32,
            Value::F32(_) => T_F32,
            Value::Bool(_) => T_BOOL,
            Value::Str(_) => T_STR,
            Value::Array(..) => T_ARR,
            Value::U64(_) => T_U64,
            Value::I64(_) => T_I64,
            Value::F64(_) => T_F64,
        }
    }

    pub fn strings(v: Vec<String>) -> Value {
        Value::Array(T_STR, v.into_iter().map(Value::Str).collect())
    }

    pub fn i32s(v: Vec<i32>) -> Value {
        Value::Array(T_I32, v.into_iter().map(Value::I32).collect())
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) if x >= 0 => Some(x as u64),
            Value::I16(x) if x >= 0 => Some(x as u64),
            Value::I32(x) if x >= 0 => Some(x as u64),
            Value::I64(x) if x >= 0 => Some(x as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::Str(s) => write_str(out, s),
            Value::Array(t, v) => {
                out.extend(t.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                for e in v {
                    e.write(out);
                }
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

// ------------------------------------------------------------------------------ container

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (input) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    pub fn nbytes(&self) -> Result<usize> {
        self.ty
            .bytes_for(self.numel())
            .with_context(|| format!("tensor `{}`", self.name))
    }
}

fn pad(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// The header (everything before the data section, padded to the alignment) and each tensor's
/// offset inside the data section.
pub fn header(kv: &[(String, Value)], tensors: &[TensorEntry]) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut h = Vec::new();
    h.extend(MAGIC);
    h.extend(VERSION.to_le_bytes());
    h.extend((tensors.len() as u64).to_le_bytes());
    h.extend((kv.len() as u64).to_le_bytes());
    let mut seen = std::collections::HashSet::new();
    for (k, v) in kv {
        ensure!(seen.insert(k.as_str()), "internal: GGUF key `{k}` twice");
        write_str(&mut h, k);
        h.extend(v.type_id().to_le_bytes());
        v.write(&mut h);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut off = 0usize;
    for t in tensors {
        write_str(&mut h, &t.name);
        h.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            h.extend(d.to_le_bytes());
        }
        h.extend(t.ty.id().to_le_bytes());
        h.extend((off as u64).to_le_bytes());
        offsets.push(off);
        off = pad(off + t.nbytes()?);
    }
    h.resize(pad(h.len()), 0);
    Ok((h, offsets))
}

/// Write a whole GGUF file: `data(i, out)` writes tensor i's bytes (exactly `nbytes`).
pub fn write_file(
    path: &Path,
    kv: &[(String, Value)],
    tensors: &[TensorEntry],
    mut data: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<()> {
    let (h, _) = header(kv, tensors)?;
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let ctx = || format!("cannot write {} (disk full?)", path.display());
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    w.write_all(&h).with_context(ctx)?;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes()?;
        let mut counter = CountingWriter {
            inner: &mut w,
            n: 0,
        };
        data(i, &mut counter)?;
        ensure!(
            counter.n == n,
            "internal: tensor `{}` wrote {} bytes, {n} expected",
            t.name,
            counter.n
        );
        w.write_all(&vec![0u8; pad(n) - n]).with_context(ctx)?;
    }
    let f = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(ctx)?;
    f.sync_data().with_context(ctx)?;
    Ok(())
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    n: usize,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A parsed GGUF file (memory-mapped).
pub struct GgufFile {
    pub path: std::path::PathBuf,
    pub version: u32,
    pub kv: BTreeMap<String, Value>,
    /// In file order, with their absolute byte ranges.
    pub tensors: Vec<(TensorEntry, std::ops::Range<usize>)>,
    mmap: memmap2::Mmap,
}

/// Refuse absurd counts and lengths before allocating for them.
const MAX_ITEMS: u64 = 1 << 24;

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            bail!(
                "{}: truncated GGUF header while reading {what} at byte {}",
                self.file.display(),
                self.pos
            );
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        ensure!(
            n <= self.b.len() as u64,
            "{}: {what}: string length {n} exceeds the file",
            self.file.display()
        );
        let s = self.take(n as usize, what)?;
        String::from_utf8(s.to_vec())
            .with_context(|| format!("{}: {what} is not UTF-8", self.file.display()))
    }
    fn value(&mut self, t: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match t {
            T_U8 => Value::U8(self.take(1, what)?[0]),
            T_I8 => Value::I8(self.take(1, what)?[0] as i8),
            T_U16 => {
                let s = self.take(2, what)?;
                Value::U16(u16::from_le_bytes([s[0], s[1]]))
            }
            T_I16 => {
                let s = self.take(2, what)?;
                Value::I16(i16::from_le_bytes([s[0], s[1]]))
            }
            T_U32 => Value::U32(self.u32(what)?),
            T_I32 => Value::I32(self.u32(what)? as i32),
            T_F32 => Value::F32(f32::from_bits(self.u32(what)?)),
            T_BOOL => {
                let b = self.take(1, what)?[0];
                ensure!(b <= 1, "{}: {what}: boolean byte {b}", self.file.display());
                Value::Bool(b == 1)
            }
            T_STR => Value::Str(self.string(what)?),
            T_ARR => {
                ensure!(
                    depth == 0,
                    "{}: {what}: nested arrays are not supported",
                    self.file.display()
                );
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                ensure!(
                    n <= MAX_ITEMS,
                    "{}: {what}: array of {n} elements",
                    self.file.display()
                );
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, what, depth + 1)?);
                }
                Value::Array(et, v)
            }
            T_U64 => Value::U64(self.u64(what)?),
            T_I64 => Value::I64(self.u64(what)? as i64),
            T_F64 => Value::F64(f64::from_bits(self.u64(what)?)),
            _ => bail!(
                "{}: {what}: unknown GGUF value type {t}",
                self.file.display()
            ),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping of a file we only read; see SafetensorsFile::open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (version, kv, tensors) = parse(&mmap, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            kv,
            tensors,
            mmap,
        })
    }

    pub fn bytes(&self, r: &std::ops::Range<usize>) -> &[u8] {
        &self.mmap[r.clone()]
    }

    pub fn tensor(&self, name: &str) -> Option<&(TensorEntry, std::ops::Range<usize>)> {
        self.tensors.iter().find(|(t, _)| t.name == name)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.kv.get(key).and_then(Value::as_u64).with_context(|| {
            format!(
                "{}: metadata `{key}` missing or not an integer",
                self.path.display()
            )
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.kv.get(key).and_then(Value::as_f64).with_context(|| {
            format!(
                "{}: metadata `{key}` missing or not a number",
                self.path.display()
            )
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.kv.get(key).and_then(Value::as_str).with_context(|| {
            format!(
                "{}: metadata `{key}` missing or not a string",
                self.path.display()
            )
        })
    }

    /// Tensor `name` decoded to f32 (ggml element order: `dims[0]` contiguous).
    pub fn f32(&self, name: &str) -> Result<(TensorEntry, Vec<f32>)> {
        let (t, r) = self
            .tensor(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.path.display()))?;
        let v = crate::quant::ggml::dequantize(t.ty, self.bytes(r), t.numel())
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{name}` decodes to a non-finite value at flat index {i}",
                self.path.display()
            );
        }
        Ok((t.clone(), v))
    }
}

/// Parse and validate a GGUF file's header against its length. Pure function.
#[allow(clippy::type_complexity)]
pub fn parse(
    b: &[u8],
    file: &Path,
) -> Result<(
    u32,
    BTreeMap<String, Value>,
    Vec<(TensorEntry, std::ops::Range<usize>)>,
)> {
    let f = file.display();
    let mut c = Cursor { b, pos: 0, file };
    let magic = c.take(4, "magic")?;
    ensure!(magic == MAGIC, "{f}: not a GGUF file (magic {magic:?})");
    let version = c.u32("version")?;
    ensure!(
        version == 2 || version == 3,
        "{f}: GGUF version {version} is not supported (2 and 3 are)"
    );
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    ensure!(
        n_tensors <= MAX_ITEMS && n_kv <= MAX_ITEMS,
        "{f}: {n_tensors} tensors and {n_kv} metadata entries: not a plausible GGUF header"
    );
    let mut kv = BTreeMap::new();
    for i in 0..n_kv {
        let k = c.string(&format!("metadata key #{i}"))?;
        let t = c.u32(&format!("type of `{k}`"))?;
        let v = c.value(t, &format!("metadata `{k}`"), 0)?;
        ensure!(
            kv.insert(k.clone(), v).is_none(),
            "{f}: metadata key `{k}` appears twice"
        );
    }
    let align = match kv.get("general.alignment") {
        None => ALIGNMENT,
        Some(v) => {
            let a = v
                .as_u64()
                .with_context(|| format!("{f}: `general.alignment` is not an integer"))?;
            ensure!(
                a > 0 && a.is_power_of_two() && a <= 1 << 20,
                "{f}: `general.alignment` {a} is not a power of two"
            );
            a as usize
        }
    };
    let mut infos = Vec::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor #{i} name"))?;
        let nd = c.u32(&format!("tensor `{name}` n_dims"))?;
        ensure!(
            (1..=4).contains(&nd),
            "{f}: tensor `{name}` has {nd} dimensions"
        );
        let mut dims = Vec::new();
        for _ in 0..nd {
            let d = c.u64(&format!("tensor `{name}` dims"))?;
            ensure!(
                d > 0 && d <= 1 << 40,
                "{f}: tensor `{name}` has dimension {d}"
            );
            dims.push(d);
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .filter(|n| *n <= 1 << 40)
            .with_context(|| format!("{f}: tensor `{name}` is implausibly large"))?;
        let tid = c.u32(&format!("tensor `{name}` type"))?;
        let ty = GgmlType::from_id(tid)
            .with_context(|| format!("{f}: tensor `{name}` has ggml type {tid}, which this reader does not decode (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_K, q5_K, q6_K)"))?;
        let off = c.u64(&format!("tensor `{name}` offset"))?;
        ensure!(
            off % align as u64 == 0,
            "{f}: tensor `{name}` offset {off} is not aligned to {align}"
        );
        let e = TensorEntry { name, dims, ty };
        let nbytes = ty
            .bytes_for(numel as usize)
            .with_context(|| format!("{f}: tensor `{}`", e.name))?;
        infos.push((e, off, nbytes));
    }
    let data_start = c.pos.div_ceil(align) * align;
    let mut tensors = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (e, off, n) in infos {
        ensure!(
            names.insert(e.name.clone()),
            "{f}: tensor `{}` appears twice",
            e.name
        );
        let start = data_start
            .checked_add(off as usize)
            .with_context(|| format!("{f}: tensor `{}` offset overflows", e.name))?;
        let end = start + n;
        ensure!(
            end <= b.len(),
            "{f}: tensor `{}` ({} bytes at {start}) runs past the end of the file ({} bytes)",
            e.name,
            n,
            b.len()
        );
        tensors.push((e, start..end));
    }
    let mut ranges: Vec<&std::ops::Range<usize>> = tensors.iter().map(|(_, r)| r).collect();
    ranges.sort_by_key(|r| r.start);
    for w in ranges.windows(2) {
        ensure!(
            w[1].start >= w[0].end,
            "{f}: tensors overlap in the data section"
        );
    }
    Ok((version, kv, tensors))
}

// ------------------------------------------------------------------------------ names, layouts

/// llama.cpp's architecture name for a config we can export.
pub fn arch_name(cfg: &ModelConfig) -> Result<&'static str> {
    match cfg.arch {
        // convert_hf_to_gguf maps LlamaForCausalLM and MistralForCausalLM to `llama`;
        // Qwen2ForCausalLM and Qwen3ForCausalLM keep their own architectures
        Arch::Llama | Arch::Mistral => Ok("llama"),
        Arch::Qwen2 => Ok("qwen2"),
        Arch::Qwen3 => Ok("qwen3"),
    }
}

/// GGUF tensor name of an HF tensor name (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let _: usize = n.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{n}.{g}.{suffix}"))
}

/// Inverse of [`gguf_name`].
pub fn hf_name(g: &str) -> Option<String> {
    match g {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = g.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let _: usize = n.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let h = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{n}.{h}.{suffix}"))
}

/// The head count the llama converter permutes a tensor's rows with, if it does:
/// q_proj with the attention heads, k_proj with the key/value heads (`LlamaModel.modify_tensors`;
/// the qwen2/qwen3 converters write Q and K as they are, their RoPE rotates halves).
pub fn permute_heads(hf: &str, cfg: &ModelConfig) -> Option<usize> {
    if !matches!(cfg.arch, Arch::Llama | Arch::Mistral) {
        return None;
    }
    if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
        Some(cfg.num_heads)
    } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
        Some(cfg.num_kv_heads)
    } else {
        None
    }
}

/// `LlamaModel.permute`: `w` is [rows, cols] row-major with rows = n_head · head_dim; within each
/// head, row `i·(hd/2) + j` (i ∈ {0,1}) moves to `2j + i`. `inverse` undoes it.
pub fn permute_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    inverse: bool,
) -> Result<Vec<f32>> {
    ensure!(
        n_head > 0 && rows.is_multiple_of(2 * n_head) && w.len() == rows * cols,
        "cannot permute {rows} rows into {n_head} heads of even size"
    );
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * hd + i * half + j;
                let gg = h * hd + 2 * j + i;
                let (src, dst) = if inverse { (gg, hf) } else { (hf, gg) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------ type mixes

/// `export.gguf_type`: llama.cpp's `llama_ftype` presets we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    /// Everything in f32 (`LLAMA_FTYPE_ALL_F32`): lossless, the input llama-quantize takes.
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "bf16")]
    BF16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_1")]
    Q4_1,
    #[serde(rename = "q5_0")]
    Q5_0,
    #[serde(rename = "q5_1")]
    Q5_1,
    #[serde(rename = "q4_k_s")]
    Q4KS,
    #[serde(rename = "q4_k_m")]
    Q4KM,
    #[serde(rename = "q5_k_s")]
    Q5KS,
    #[serde(rename = "q5_k_m")]
    Q5KM,
    #[serde(rename = "q6_k")]
    Q6K,
}

impl FileType {
    /// `enum llama_ftype` (`general.file_type`).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4KS => 14,
            FileType::Q4KM => 15,
            FileType::Q5KS => 16,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
            FileType::BF16 => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q5_0 => "q5_0",
            FileType::Q5_1 => "q5_1",
            FileType::Q4KS => "q4_k_s",
            FileType::Q4KM => "q4_k_m",
            FileType::Q5KS => "q5_k_s",
            FileType::Q5KM => "q5_k_m",
            FileType::Q6K => "q6_k",
        }
    }

    /// The default type of the mix (`llama_model_quantize_impl`'s `default_type`).
    pub fn base(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q4KS | FileType::Q4KM => GgmlType::Q4K,
            FileType::Q5KS | FileType::Q5KM => GgmlType::Q5K,
            FileType::Q6K => GgmlType::Q6K,
        }
    }
}

/// A `--tensor-type`-style override: the first pattern that matches (regex search in the GGUF
/// tensor name) decides the type of a quantizable tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeOverride {
    pub pattern: String,
    #[serde(rename = "type")]
    pub ty: String,
}

/// Compiled overrides.
pub struct Overrides(Vec<(regex::Regex, GgmlType)>);

impl Overrides {
    pub fn new(o: &[TypeOverride]) -> Result<Self> {
        let mut v = Vec::new();
        for (i, t) in o.iter().enumerate() {
            let re = regex::Regex::new(&t.pattern).with_context(|| {
                format!("tensor_types[{i}]: `{}` is not a valid regex", t.pattern)
            })?;
            let ty = GgmlType::parse(&t.ty)
                .with_context(|| {
                    format!(
                        "tensor_types[{i}]: unknown type `{}` (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, f16, bf16, f32)",
                        t.ty
                    )
                })?;
            v.push((re, ty));
        }
        Ok(Overrides(v))
    }

    fn find(&self, name: &str) -> Option<GgmlType> {
        self.0
            .iter()
            .find(|(re, _)| re.is_match(name))
            .map(|(_, t)| *t)
    }
}

/// llama-quant.cpp `use_more_bits`.
fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The ggml type llama-quantize gives tensor `name` (GGUF name, 2-d, `ncols` = ne[0]) of a
/// llama model with `n_layers` layers and `n_gqa` = heads / kv heads, for mix `ft`
/// (`llama_tensor_get_type`: manual overrides, then the mix's rules, then the shape fallback).
/// `calibrated`: the tensor's rounding is calibrated (an importance matrix, or GPTQ onto the
/// grid) — llama-quantize's `has_imatrix`, which gives the first n_layer/8 `ffn_down` tensors of
/// a Q4_0 / Q5_0 mix Q4_1 / Q5_1 ("guard against craziness"). 1-d tensors (norms) stay F32 and
/// are not passed here.
pub fn tensor_type(
    ft: FileType,
    name: &str,
    ncols: usize,
    n_layers: usize,
    tied: bool,
    calibrated: bool,
    overrides: &Overrides,
) -> GgmlType {
    let base = ft.base();
    if !base.is_quantized() {
        // f16 / bf16 files: every 2-d weight in that type (the converter's --outtype)
        return overrides.find(name).unwrap_or(base);
    }
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(n, _)| n.parse::<i64>().ok());
    let nl = n_layers as i64;
    let cat = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .map(|(_, r)| r.trim_end_matches(".weight"))
        .unwrap_or(name.trim_end_matches(".weight"));
    let mut t = base;
    if let Some(o) = overrides.find(name) {
        t = o;
    } else if name == "output.weight" || (tied && name == "token_embd.weight") {
        // output (and a tied embedding): Q6_K unless the mix is Q8_0 or the row does not fit
        if !ncols.is_multiple_of(base.block_size()) {
            t = GgmlType::Q8_0;
        } else if base != GgmlType::Q8_0 {
            t = GgmlType::Q6K;
        }
    } else if name == "token_embd.weight" {
        // the base type
    } else if let Some(i) = layer {
        match cat {
            "attn_v" => {
                if matches!(ft, FileType::Q4KM | FileType::Q5KM) && use_more_bits(i, nl) {
                    t = GgmlType::Q6K;
                } else if ft == FileType::Q4KS && i < 4 {
                    t = GgmlType::Q5K;
                }
            }
            "ffn_down" => {
                if matches!(ft, FileType::Q4KM | FileType::Q5KM) && use_more_bits(i, nl) {
                    t = GgmlType::Q6K;
                } else if ft == FileType::Q4KS && i < nl / 8 {
                    t = GgmlType::Q5K;
                } else if matches!(ft, FileType::Q4_0 | FileType::Q5_0) && calibrated && i < nl / 8
                {
                    t = if ft == FileType::Q4_0 {
                        GgmlType::Q4_1
                    } else {
                        GgmlType::Q5_1
                    };
                }
            }
            _ => {}
        }
    }
    fallback(t, ncols)
}

/// llama-quant.cpp `tensor_type_fallback`: a row that is not a whole number of blocks.
fn fallback(t: GgmlType, ncols: usize) -> GgmlType {
    if ncols.is_multiple_of(t.block_size()) {
        return t;
    }
    let r = match t {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if ncols.is_multiple_of(r.block_size()) {
        r
    } else {
        GgmlType::F16
    }
}

// ------------------------------------------------------------------------------ metadata

fn js<'a>(v: &'a Json, k: &str) -> Option<&'a Json> {
    v.get(k).filter(|x| !x.is_null())
}

/// `general.*` and `llama.*` keys for `cfg` (conversion/base.py `set_gguf_parameters`,
/// conversion/llama.py), plus `general.file_type` and `general.quantization_version`.
pub fn model_metadata(cfg: &ModelConfig, ft: FileType, name: &str) -> Result<Vec<(String, Value)>> {
    let arch = arch_name(cfg)?;
    let a = |k: &str| format!("{arch}.{k}");
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(name.into())),
        (a("block_count"), Value::U32(cfg.num_layers as u32)),
    ];
    if let Some(n) = js(&cfg.raw, "max_position_embeddings").and_then(Json::as_u64) {
        kv.push((a("context_length"), Value::U32(n as u32)));
    }
    kv.extend([
        (a("embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (
            a("feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (a("attention.head_count"), Value::U32(cfg.num_heads as u32)),
        (
            a("attention.head_count_kv"),
            Value::U32(cfg.num_kv_heads as u32),
        ),
    ]);
    if cfg.rope_llama3.is_some() {
        bail!("GGUF export of Llama-3 frequency-scaled RoPE (rope_type llama3: the converter's rope_freqs tensor) is not supported yet");
    }
    if cfg.rope_linear_factor != 1.0 {
        kv.push((a("rope.scaling.type"), Value::Str("linear".into())));
        kv.push((
            a("rope.scaling.factor"),
            Value::F32(cfg.rope_linear_factor as f32),
        ));
    }
    kv.push((a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)));
    kv.push((
        a("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    ));
    if js(&cfg.raw, "head_dim").is_some() {
        kv.push((a("attention.key_length"), Value::U32(cfg.head_dim as u32)));
        kv.push((a("attention.value_length"), Value::U32(cfg.head_dim as u32)));
    }
    kv.push(("general.file_type".into(), Value::U32(ft.id())));
    kv.push((a("vocab_size"), Value::U32(cfg.vocab_size as u32)));
    kv.push((a("rope.dimension_count"), Value::U32(cfg.head_dim as u32)));
    if ft.base().is_quantized() {
        kv.push((
            "general.quantization_version".into(),
            Value::U32(QUANTIZATION_VERSION),
        ));
    }
    kv.push(("general.alignment".into(), Value::U32(ALIGNMENT as u32)));
    Ok(kv)
}

/// conversion/base.py `does_token_look_special`: added tokens some models forget to mark
/// special.
fn does_token_look_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// `tokenizer.ggml.pre` from the pre-tokenizer's structure (llama.cpp identifies it by hashing
/// the tokenization of a test text; these are the structures of the families we read).
fn pre_tokenizer(tok: &Json, file: &Path) -> Result<&'static str> {
    let f = file.display();
    let pre = js(tok, "pre_tokenizer").with_context(|| format!("{f}: no `pre_tokenizer`"))?;
    let is_bytelevel_regex = |p: &Json| {
        p.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && p.get("use_regex").and_then(Json::as_bool).unwrap_or(true)
    };
    if is_bytelevel_regex(pre) {
        return Ok("gpt-2");
    }
    if pre.get("type").and_then(Json::as_str) == Some("Sequence") {
        if let Some(ps) = pre.get("pretokenizers").and_then(Json::as_array) {
            // a regex Split then byte-level without its own regex: Qwen2's and Llama-3's
            // patterns (llama.cpp's `qwen2` and `llama-bpe` pre-tokenizers)
            let split = ps.first().filter(|p| {
                p.get("type").and_then(Json::as_str) == Some("Split")
                    && ps.len() == 2
                    && ps[1].get("type").and_then(Json::as_str) == Some("ByteLevel")
                    && ps[1].get("use_regex").and_then(Json::as_bool) == Some(false)
            });
            if let Some(re) = split
                .and_then(|p| p.get("pattern"))
                .and_then(|p| p.get("Regex"))
                .and_then(Json::as_str)
            {
                if re == QWEN2_SPLIT {
                    return Ok("qwen2");
                }
                if re == LLAMA3_SPLIT {
                    return Ok("llama-bpe");
                }
            }
            if ps.len() == 2
                && ps[0].get("type").and_then(Json::as_str) == Some("Digits")
                && ps[0].get("individual_digits").and_then(Json::as_bool) == Some(true)
                && is_bytelevel_regex(&ps[1])
            {
                return Ok("smollm");
            }
        }
    }
    bail!("{f}: pre-tokenizer {pre} is not one whose llama.cpp name we know (GPT-2 byte level, SmolLM, Qwen2, Llama-3)")
}

/// The Split regex of Qwen2/Qwen3's tokenizer.json (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's (digits in runs of up to three; llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.*` keys from tokenizer.json (+ tokenizer_config.json when present): a byte-level
/// BPE with merges → `tokenizer.ggml.model = gpt2`, the tokens with their types as
/// `get_vocab_base` assigns them, the merges, the special token ids, `add_bos_token`, the chat
/// template.
pub fn tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let tpath = dir.join("tokenizer.json");
    let f = tpath.display().to_string();
    let tok: Json =
        serde_json::from_slice(&std::fs::read(&tpath).with_context(|| format!("cannot read {f}"))?)
            .with_context(|| format!("{f}: not valid JSON"))?;
    let model = js(&tok, "model").with_context(|| format!("{f}: no `model`"))?;
    let mtype = model.get("type").and_then(Json::as_str).unwrap_or("");
    ensure!(
        mtype == "BPE",
        "{f}: GGUF export supports byte-level BPE tokenizers (llama.cpp `gpt2`), found `{mtype}`"
    );
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .with_context(|| format!("{f}: `model.vocab` missing"))?;
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .with_context(|| format!("{f}: id of `{t}` is not an integer"))?
            as usize;
        ensure!(id < n, "{f}: token `{t}` has id {id} ≥ vocab_size {n}");
        tokens[id] = Some(t.clone());
    }
    let mut types = vec![1i32; n]; // NORMAL
    let mut special: BTreeMap<String, usize> = BTreeMap::new();
    if let Some(added) = js(&tok, "added_tokens").and_then(Json::as_array) {
        for a in added {
            let id = a
                .get("id")
                .and_then(Json::as_u64)
                .with_context(|| format!("{f}: added token without an id"))?
                as usize;
            let content = a
                .get("content")
                .and_then(Json::as_str)
                .with_context(|| format!("{f}: added token {id} without content"))?;
            ensure!(
                id < n,
                "{f}: added token `{content}` has id {id} ≥ vocab_size {n}"
            );
            tokens[id] = Some(content.to_string());
            let is_special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            // get_vocab_base: special (or special-looking) added tokens are CONTROL, others
            // USER_DEFINED
            let looks_special = does_token_look_special(content);
            types[id] = if is_special || looks_special { 3 } else { 4 };
            special.insert(content.to_string(), id);
        }
    }
    let mut list = Vec::with_capacity(n);
    for (i, t) in tokens.into_iter().enumerate() {
        match t {
            Some(t) => list.push(t),
            None => {
                list.push(format!("[PAD{i}]"));
                types[i] = 5; // UNUSED
            }
        }
    }
    let merges: Vec<String> = match model.get("merges").and_then(Json::as_array) {
        Some(m) => m
            .iter()
            .map(|x| match x {
                Json::String(s) => Ok(s.clone()),
                Json::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => bail!("{f}: a merge is not a pair of strings"),
                },
                _ => bail!("{f}: a merge is neither a string nor a pair"),
            })
            .collect::<Result<_>>()?,
        None => bail!("{f}: `model.merges` missing: not a BPE tokenizer llama.cpp can load"),
    };
    let mut kv: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::Str(pre_tokenizer(&tok, &tpath)?.into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::strings(list)),
        ("tokenizer.ggml.token_type".into(), Value::i32s(types)),
        ("tokenizer.ggml.merges".into(), Value::strings(merges)),
    ];
    // special ids: tokenizer_config.json's tokens by content, else config.json's ids
    // (gguf-py SpecialVocab)
    let tc: Json = std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Json::Null);
    let content_of = |k: &str| -> Option<String> {
        match js(&tc, k)? {
            Json::String(s) => Some(s.clone()),
            o => o.get("content").and_then(Json::as_str).map(String::from),
        }
    };
    for (kind, cfg_key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", ""),
        ("pad", "pad_token_id"),
    ] {
        let id = content_of(&format!("{kind}_token"))
            .and_then(|c| {
                special
                    .get(&c)
                    .copied()
                    .or_else(|| vocab.get(&c).and_then(Json::as_u64).map(|x| x as usize))
            })
            .or_else(|| {
                if cfg_key.is_empty() {
                    None
                } else {
                    js(&cfg.raw, cfg_key)
                        .and_then(Json::as_u64)
                        .map(|x| x as usize)
                }
            });
        if let Some(id) = id.filter(|i| *i < n) {
            kv.push((
                format!("tokenizer.ggml.{kind}_token_id"),
                Value::U32(id as u32),
            ));
        }
    }
    // add_bos: tokenizer_config's flag, else whether the post-processor's single-sequence
    // template starts with a special token
    let add_bos = js(&tc, "add_bos_token")
        .and_then(Json::as_bool)
        .or_else(|| {
            let single = tok.pointer("/post_processor/single")?.as_array()?;
            Some(single.first()?.get("SpecialToken").is_some())
        });
    // conversion/llama.py: SmolLM-sized vocabularies (49152) never add BOS in llama.cpp
    let add_bos = if cfg.vocab_size == 49152 {
        Some(false)
    } else {
        add_bos
    };
    if let Some(b) = add_bos {
        kv.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
    }
    if let Some(t) = js(&tc, "chat_template").and_then(Json::as_str) {
        kv.push(("tokenizer.chat_template".into(), Value::Str(t.into())));
    } else if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        kv.push(("tokenizer.chat_template".into(), Value::Str(t)));
    }
    Ok(kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.11.self_attn.k_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&g).unwrap(), hf);
        }
        assert_eq!(
            gguf_name("model.layers.2.self_attn.o_proj.weight").unwrap(),
            "blk.2.attn_output.weight"
        );
        assert!(gguf_name("model.layers.x.mlp.up_proj.weight").is_none());
    }

    #[test]
    fn permutation_matches_the_converter_and_inverts() {
        // one head of 4 rows, 1 column: HF rows [a0 a1 | b0 b1] → GGML [a0 b0 a1 b1]
        let w = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(
            permute_rows(&w, 4, 1, 1, false).unwrap(),
            vec![0.0, 2.0, 1.0, 3.0]
        );
        let w: Vec<f32> = (0..48).map(|x| x as f32).collect();
        let p = permute_rows(&w, 8, 6, 2, false).unwrap();
        assert_ne!(p, w);
        assert_eq!(permute_rows(&p, 8, 6, 2, true).unwrap(), w);
    }

    #[test]
    fn q4_k_m_mix_follows_llama_cpp() {
        let o = Overrides::new(&[]).unwrap();
        let t = |name: &str, ncols| tensor_type(FileType::Q4KM, name, ncols, 8, false, false, &o);
        // use_more_bits(i, 8): i < 1 || i >= 7 || (i - 1) % 3 == 2 → layers 0, 3, 6, 7
        let v: Vec<_> = (0..8)
            .map(|i| t(&format!("blk.{i}.attn_v.weight"), 256))
            .collect();
        use GgmlType::*;
        assert_eq!(v, vec![Q6K, Q4K, Q4K, Q6K, Q4K, Q4K, Q6K, Q6K]);
        assert_eq!(t("blk.3.ffn_down.weight", 768), Q6K);
        assert_eq!(t("blk.1.ffn_down.weight", 768), Q4K);
        assert_eq!(t("blk.1.attn_q.weight", 256), Q4K);
        assert_eq!(t("output.weight", 256), Q6K);
        assert_eq!(t("token_embd.weight", 256), Q4K);
        // rows that are not whole super-blocks fall back (SmolLM2's 576)
        assert_eq!(t("blk.1.attn_q.weight", 576), Q5_0);
        assert_eq!(t("blk.0.attn_v.weight", 576), Q8_0);
        assert_eq!(t("output.weight", 576), Q8_0);
        // tied embeddings take the output's type
        assert_eq!(
            tensor_type(FileType::Q4KM, "token_embd.weight", 256, 8, true, false, &o),
            Q6K
        );
        // Q4_0: output Q6_K, everything else Q4_0
        assert_eq!(
            tensor_type(FileType::Q4_0, "output.weight", 256, 8, false, false, &o),
            Q6K
        );
        assert_eq!(
            tensor_type(
                FileType::Q4_0,
                "blk.0.ffn_down.weight",
                768,
                8,
                false,
                false,
                &o
            ),
            Q4_0
        );
        // calibrated (llama-quantize --imatrix): the first n_layer/8 ffn_down of Q4_0 / Q5_0
        // mixes take Q4_1 / Q5_1; nothing else moves
        let c = |ft, name: &str| tensor_type(ft, name, 768, 30, false, true, &o);
        for i in 0..30 {
            let want = if i < 3 { Q4_1 } else { Q4_0 };
            assert_eq!(
                c(FileType::Q4_0, &format!("blk.{i}.ffn_down.weight")),
                want,
                "{i}"
            );
            assert_eq!(c(FileType::Q4_0, &format!("blk.{i}.ffn_up.weight")), Q4_0);
        }
        assert_eq!(c(FileType::Q5_0, "blk.2.ffn_down.weight"), Q5_1);
        assert_eq!(c(FileType::Q4KM, "blk.4.ffn_down.weight"), Q4K);
        let o = Overrides::new(&[TypeOverride {
            pattern: "attn_v".into(),
            ty: "q8_0".into(),
        }])
        .unwrap();
        assert_eq!(
            tensor_type(
                FileType::Q4KM,
                "blk.1.attn_v.weight",
                256,
                8,
                false,
                false,
                &o
            ),
            Q8_0
        );
        assert!(Overrides::new(&[TypeOverride {
            pattern: "(".into(),
            ty: "q8_0".into()
        }])
        .is_err());
    }

    #[test]
    fn header_round_trips_through_the_parser() {
        let kv = vec![
            (
                "general.architecture".to_string(),
                Value::Str("llama".into()),
            ),
            ("x.n".to_string(), Value::U32(7)),
            (
                "x.toks".to_string(),
                Value::strings(vec!["a".into(), "bc".into()]),
            ),
        ];
        let tensors = vec![
            TensorEntry {
                name: "a".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
            TensorEntry {
                name: "b".into(),
                dims: vec![3],
                ty: GgmlType::F32,
            },
        ];
        let (mut bytes, offs) = header(&kv, &tensors).unwrap();
        assert_eq!(bytes.len() % ALIGNMENT, 0);
        assert_eq!(offs, vec![0, 96]); // 68 bytes of Q8_0 padded to 96
        bytes.resize(bytes.len() + 96 + 12, 0);
        let (v, kvp, ts) = parse(&bytes, Path::new("t.gguf")).unwrap();
        assert_eq!(v, 3);
        assert_eq!(kvp["x.n"], Value::U32(7));
        assert_eq!(ts.len(), 2);
        assert_eq!(ts[1].1.len(), 12);
        // a truncated file is refused with the tensor named
        let e = parse(&bytes[..bytes.len() - 1], Path::new("t.gguf")).unwrap_err();
        assert!(format!("{e:#}").contains("`b`"), "{e:#}");
    }
}
