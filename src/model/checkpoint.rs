//! A Hugging Face model folder: config.json, one or many safetensors files (with
//! `model.safetensors.index.json`), tokenizer.json. Tensors stay memory-mapped; a caller reads
//! one tensor at a time, so the whole model is never in RAM.

use super::config::ModelConfig;
use crate::safetensors_file::{to_f32, DType, SafetensorsFile, TensorInfo};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub files: Vec<SafetensorsFile>,
    /// tensor name → index into `files`
    index: BTreeMap<String, usize>,
    /// GGUF checkpoints: HF tensor name → (ggml type, bytes) as stored in the GGUF file (the
    /// in-memory image in `files` holds them dequantized to f32).
    pub gguf_stored: Option<BTreeMap<String, (crate::quant::ggml::GgmlType, usize)>>,
    /// A PEFT LoRA adapter in `adapter/` beside the weights (EoRA's compensation adapters):
    /// its tensors and the scaling its config gives each module.
    pub adapter: Option<(SafetensorsFile, crate::formats::peft::LoraScaling)>,
}

/// `adapter/adapter_config.json` + `adapter/adapter_model.safetensors`, when present.
fn open_adapter(
    dir: &Path,
) -> Result<Option<(SafetensorsFile, crate::formats::peft::LoraScaling)>> {
    use crate::formats::peft;
    let d = dir.join(peft::DIR);
    let cfg = d.join(peft::CONFIG);
    if !cfg.is_file() {
        return Ok(None);
    }
    let scaling = peft::read_config(&cfg)?;
    let f = SafetensorsFile::open(&d.join(format!("{}.safetensors", peft::STEM)))?;
    Ok(Some((f, scaling)))
}

/// Parse a sharded checkpoint's `model.safetensors.index.json`: tensor name → shard file name.
/// Shard names must stay inside the model folder. Pure function: the fuzz target calls it.
pub fn parse_index(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, String>> {
    let p = path.display();
    let v: serde_json::Value =
        serde_json::from_slice(bytes).with_context(|| format!("{p}: not valid JSON"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{p}: missing object `weight_map`"))?;
    let mut out = BTreeMap::new();
    for (name, f) in map {
        let fname = f
            .as_str()
            .with_context(|| format!("{p}: `weight_map.{name}` must be a file name"))?;
        if fname.is_empty()
            || fname.contains('/')
            || fname.contains('\\')
            || fname.contains("..")
            || fname.contains('\0')
        {
            bail!("{p}: `weight_map.{name}`: file name `{fname}` must name a file inside the model folder");
        }
        out.insert(name.clone(), fname.to_string());
    }
    Ok(out)
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: model directory not found", dir.display());
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        if index_path.exists() {
            let text = std::fs::read(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let weight_map = parse_index(&text, &index_path)?;
            let mut by_file: BTreeMap<String, usize> = BTreeMap::new();
            for (name, fname) in weight_map {
                let fi = match by_file.get(&fname) {
                    Some(i) => *i,
                    None => {
                        files.push(SafetensorsFile::open(&dir.join(&fname))?);
                        by_file.insert(fname.clone(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[fi].tensors.contains_key(&name) {
                    bail!(
                        "{}: tensor `{name}` is listed in {} but missing from the file",
                        dir.join(&fname).display(),
                        index_path.display()
                    );
                }
                index.insert(name, fi);
            }
        } else if !dir.join("model.safetensors").exists()
            && dir.join(crate::formats::gguf::FILE_NAME).exists()
        {
            let (f, stored) = gguf_image(&dir.join(crate::formats::gguf::FILE_NAME), &config)?;
            for name in f.tensors.keys() {
                index.insert(name.clone(), 0);
            }
            files.push(f);
            return Ok(Checkpoint {
                dir: dir.to_path_buf(),
                config,
                files,
                index,
                gguf_stored: Some(stored),
                adapter: None,
            });
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                bail!(
                    "{}: no model.safetensors or model.safetensors.index.json found",
                    dir.display()
                );
            }
            let f = SafetensorsFile::open(&single)?;
            for name in f.tensors.keys() {
                index.insert(name.clone(), 0);
            }
            files.push(f);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            files,
            index,
            gguf_stored: None,
            adapter: open_adapter(dir)?,
        })
    }

    /// The adapter of `module` (B already multiplied by the config's scaling), if the
    /// checkpoint has a PEFT adapter folder that adapts it.
    pub fn adapter_of(
        &self,
        module: &str,
        shape: &[usize],
    ) -> Result<Option<crate::model::layer::Adapter>> {
        let Some((f, scaling)) = &self.adapter else {
            return Ok(None);
        };
        let (an, bn) = crate::formats::peft::tensor_names(module);
        let (Some(ai), Some(bi)) = (f.tensors.get(&an), f.tensors.get(&bn)) else {
            return Ok(None);
        };
        let p = f.path.display();
        let read = |name: &str, info: &TensorInfo| -> Result<Vec<f32>> {
            let v = to_f32(info.dtype, f.bytes(info)).with_context(|| {
                format!(
                    "{p}: tensor `{name}` has dtype {}, expected a floating-point dtype",
                    info.dtype.name()
                )
            })?;
            if v.iter().any(|x| !x.is_finite()) {
                bail!("{p}: tensor `{name}` holds a non-finite value");
            }
            Ok(v)
        };
        let r = ai.shape.first().copied().unwrap_or(0);
        if ai.shape != [r, shape[1]] || bi.shape != [shape[0], r] || r == 0 {
            bail!(
                "{p}: `{an}` is {:?} and `{bn}` {:?}; the {module} weight is {shape:?}, so expected [r, {}] and [{}, r]",
                ai.shape, bi.shape, shape[1], shape[0]
            );
        }
        let a = ndarray::Array2::from_shape_vec((r, shape[1]), read(&an, ai)?)?;
        let sc = scaling.of(module) as f32;
        let b = ndarray::Array2::from_shape_vec((shape[0], r), read(&bn, bi)?)?.mapv(|x| x * sc);
        Ok(Some(crate::model::layer::Adapter { a, b }))
    }

    /// Check that every tensor of a dense checkpoint is present with the right shape and a
    /// floating-point dtype.
    pub fn validate_dense(&self) -> Result<()> {
        for (name, shape) in self.config.expected_tensors() {
            let (info, file) = self.info(&name)?;
            if info.shape != shape {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, config.json implies {:?}",
                    file.display(),
                    info.shape,
                    shape
                );
            }
            if !info.dtype.is_float() {
                bail!(
                    "{}: tensor `{name}` has dtype {}, expected a floating-point dtype",
                    file.display(),
                    info.dtype.name()
                );
            }
        }
        Ok(())
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// Tensor metadata and the file that holds it.
    pub fn info(&self, name: &str) -> Result<(&TensorInfo, &Path)> {
        let fi = *self
            .index
            .get(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.dir.display()))?;
        let f = &self.files[fi];
        Ok((&f.tensors[name], &f.path))
    }

    /// The tensor's stored bytes, untouched.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let fi = *self
            .index
            .get(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.dir.display()))?;
        let f = &self.files[fi];
        let info = &f.tensors[name];
        Ok((info, f.bytes(info)))
    }

    /// Let the OS drop a tensor's pages from our resident set (see `SafetensorsFile::release`).
    pub fn release(&self, name: &str) {
        if let Some(&fi) = self.index.get(name) {
            let f = &self.files[fi];
            f.release(&f.tensors[name]);
        }
    }

    /// Release every tensor whose name starts with `prefix`.
    pub fn release_prefix(&self, prefix: &str) {
        for (name, &fi) in self.index.range(prefix.to_string()..) {
            if !name.starts_with(prefix) {
                break;
            }
            let f = &self.files[fi];
            f.release(&f.tensors[name]);
        }
    }

    /// The tensor as f32, refusing NaN/Inf (a corrupt or diverged checkpoint).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let (info, bytes) = self.raw(name)?;
        let (_, path) = self.info(name)?;
        let v = to_f32(info.dtype, bytes).with_context(|| {
            format!(
                "{}: tensor `{name}` has dtype {}, expected a floating-point dtype",
                path.display(),
                info.dtype.name()
            )
        })?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{name}` holds a non-finite value ({}) at flat index {i}",
                path.display(),
                v[i]
            );
        }
        Ok(v)
    }

    /// Storage dtype of the checkpoint's floating-point weights (of the embedding).
    pub fn weight_dtype(&self) -> DType {
        self.info("model.embed_tokens.weight")
            .map(|(i, _)| i.dtype)
            .unwrap_or(DType::F32)
    }

    /// Bytes on disk of all safetensors files.
    pub fn safetensors_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| std::fs::metadata(&f.path).ok())
            .map(|m| m.len())
            .sum()
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
}

/// Read a GGUF file we can evaluate: its metadata must agree with config.json, every tensor is
/// decoded to f32 under its HF name (Q/K rows un-permuted) into an in-memory safetensors image.
/// Returns the image and each tensor's stored type and byte count.
#[allow(clippy::type_complexity)]
fn gguf_image(
    path: &Path,
    cfg: &ModelConfig,
) -> Result<(
    SafetensorsFile,
    BTreeMap<String, (crate::quant::ggml::GgmlType, usize)>,
)> {
    use crate::formats::gguf;
    let g = gguf::GgufFile::open(path)?;
    let f = path.display();
    let arch = g.get_str("general.architecture")?.to_string();
    let want = gguf::arch_name(cfg)?;
    if arch != want {
        bail!("{f}: architecture `{arch}`, config.json describes `{want}`");
    }
    for (k, v) in [
        ("block_count", cfg.num_layers),
        ("embedding_length", cfg.hidden_size),
        ("feed_forward_length", cfg.intermediate_size),
        ("attention.head_count", cfg.num_heads),
        ("attention.head_count_kv", cfg.num_kv_heads),
    ] {
        let got = g.get_u64(&format!("{arch}.{k}"))?;
        if got != v as u64 {
            bail!("{f}: `{arch}.{k}` is {got}, config.json implies {v}");
        }
    }
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    let mut stored = BTreeMap::new();
    if cfg.moe.is_some() {
        let got = g.get_u64(&format!("{arch}.expert_count"))?;
        let want = cfg.moe.map_or(0, |m| m.experts) as u64;
        if got != want {
            bail!("{f}: `{arch}.expert_count` is {got}, config.json implies {want}");
        }
    }
    for (t, r) in &g.tensors {
        let names = gguf::hf_names(&t.name, cfg)
            .with_context(|| format!("{f}: tensor `{}` is not one of the llama layout", t.name))?;
        let (_, all) = g.f32(&t.name)?;
        let mut shape: Vec<usize> = t.dims.iter().rev().map(|d| *d as usize).collect();
        // a stack of experts: [experts, rows, cols], one HF tensor per expert
        if names.len() > 1 {
            if shape.len() != 3 || shape[0] != names.len() {
                bail!(
                    "{f}: tensor `{}` has shape {shape:?}; {} experts of a 2-d weight expected",
                    t.name,
                    names.len()
                );
            }
            shape.remove(0);
        }
        let per = all.len() / names.len();
        let stored_bytes = r.len() / names.len();
        for (hf, v) in names.into_iter().zip(all.chunks(per.max(1))) {
            let mut v = v.to_vec();
            let shape = if gguf::squeezed(&hf) {
                vec![1, v.len()]
            } else {
                shape.clone()
            };
            if let (Some(h), [rows, cols]) = (gguf::permute_heads(&hf, cfg), shape.as_slice()) {
                v = gguf::permute_rows(&v, *rows, *cols, h, true)
                    .with_context(|| format!("{f}: tensor `{}`", t.name))?;
            }
            let start = data.len();
            data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            header.insert(
                hf.clone(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
            stored.insert(hf, (t.ty, stored_bytes));
        }
    }
    let mut hb = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while hb.len() % 8 != 0 {
        hb.push(b' ');
    }
    let mut img = Vec::with_capacity(8 + hb.len() + data.len());
    img.extend((hb.len() as u64).to_le_bytes());
    img.extend(hb);
    img.extend(data);
    Ok((SafetensorsFile::from_bytes(path, &img)?, stored))
}

impl Checkpoint {
    /// The input quantizer llama.cpp's CPU backend puts on a matmul with stored tensor `hf`
    /// (an HF tensor name), when `on` ([`crate::model::EvalOptions`]'s
    /// `llama_cpp_activations`); refused for a checkpoint that is not a GGUF file.
    pub fn llama_cpp_input(
        &self,
        hf: &str,
        on: bool,
    ) -> Result<Option<crate::quant::ggml::VecDot>> {
        if !on {
            return Ok(None);
        }
        let stored = self.gguf_stored.as_ref().with_context(|| {
            format!(
                "{}: llama.cpp's activation quantization applies to a GGUF checkpoint (model.gguf)",
                self.dir.display()
            )
        })?;
        let (ty, _) = stored
            .get(hf)
            .with_context(|| format!("{}: no tensor `{hf}` in model.gguf", self.dir.display()))?;
        Ok(crate::quant::ggml::VecDot::of(*ty))
    }
}

/// Total size of the regular files in a folder (not recursive).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Read a dense tensor as f32, checking its shape.
pub fn read_checked(ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let (info, path) = ckpt.info(name)?;
    if info.shape != shape {
        bail!(
            "{}: tensor `{name}` has shape {:?}, config.json implies {:?}",
            path.display(),
            info.shape,
            shape
        );
    }
    ckpt.f32(name)
}
