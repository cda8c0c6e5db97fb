//! Writers of compressed checkpoints. An exporter only lays out bytes: it never runs an
//! algorithm. Tensors that no pass changed are copied byte for byte from the source.

pub mod writer;

use crate::engine::LayerSink;
use crate::model::layer::{LayerWeights, Linear, Repr};
use crate::model::Checkpoint;
use crate::quant::QuantArgs;
use crate::safetensors_file::from_f32;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use writer::SafetensorsWriter;

use crate::formats::gguf::{self, FileType, TensorEntry, TypeOverride};
use crate::model::DType;

pub use crate::formats::compressed_tensors::SparseFormat;
pub use crate::formats::{Format, Order};

/// Files copied unchanged from the model folder besides the weights.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
];

/// An exporter's progress, for resuming.
#[derive(Clone, Serialize, Deserialize)]
pub struct ExporterState {
    writer: writer::WriterState,
    quantized: Vec<(String, QuantArgs, Order)>,
    unquantized: Vec<String>,
    #[serde(default)]
    low_rank: Vec<(String, usize)>,
    #[serde(default)]
    true_sequential: Option<bool>,
    #[serde(default)]
    sparsity: SparsityTally,
    #[serde(default)]
    linears: Vec<String>,
    #[serde(default)]
    act_bits: Vec<Option<u32>>,
    #[serde(default)]
    gguf: Option<GgufState>,
    #[serde(default)]
    adapter_writer: Option<writer::WriterState>,
    #[serde(default)]
    adapters: Vec<(String, usize)>,
    #[serde(default)]
    sparse_format: SparseFormat,
    /// The further exports of a list (subfolder, format, largest shard, state).
    #[serde(default)]
    also: Vec<(String, Format, usize, ExporterState)>,
}

/// What a GGUF export needs besides the spill file: the mix, the overrides, and every tensor
/// written so far (GGUF name, dims, ggml type), in order.
#[derive(Clone, Serialize, Deserialize)]
pub struct GgufState {
    pub file_type: FileType,
    pub overrides: Vec<TypeOverride>,
    entries: Vec<TensorEntry>,
}

/// What the exporter saw of sparse linears (measured on the values it wrote).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct SparsityTally {
    /// Modules written with a mask.
    sparse: Vec<String>,
    /// Zeros and weights over every decoder-layer linear.
    zeros: usize,
    numel: usize,
    /// Every sparse linear has at most 2 non-zeros in each 4 consecutive inputs.
    all_2_4: bool,
}

impl SparsityTally {
    fn add(&mut self, prefix: &str, lin: &Linear) {
        let w = lin.weight();
        self.zeros += w.iter().filter(|v| **v == 0.0).count();
        self.numel += w.len();
        if lin.mask().is_none() {
            return;
        }
        let cols = w.ncols();
        let conforms = cols.is_multiple_of(4)
            && w.as_slice().is_some_and(|s| {
                s.chunks(4)
                    .all(|g| g.iter().filter(|v| **v != 0.0).count() <= 2)
            });
        self.all_2_4 = conforms && (self.sparse.is_empty() || self.all_2_4);
        self.sparse.push(prefix.to_string());
    }

    /// The `sparsity_config` block, when any linear was written with a mask.
    fn block(&self, all_linears: &[String], format: SparseFormat) -> Option<Value> {
        if self.sparse.is_empty() {
            return None;
        }
        let dense: Vec<String> = all_linears
            .iter()
            .filter(|m| !self.sparse.contains(m))
            .cloned()
            .collect();
        let structure = if self.all_2_4 { "2:4" } else { "unstructured" };
        let global = self.zeros as f64 / self.numel.max(1) as f64;
        Some(crate::formats::compressed_tensors::sparsity_config(
            global, structure, &dense, format,
        ))
    }
}

pub struct Exporter {
    pub format: Format,
    dir: PathBuf,
    writer: Option<SafetensorsWriter>,
    /// (module name, args) of every quantized linear written.
    quantized: Vec<(String, QuantArgs, Order)>,
    /// Decoder-layer linears left unquantized.
    unquantized: Vec<String>,
    /// (module name, rank) of every linear written as two factors.
    low_rank: Vec<(String, usize)>,
    /// Whether every quantized linear was quantized "true sequentially" (as recorded by the pass).
    true_sequential: Option<bool>,
    sparsity: SparsityTally,
    /// Every decoder-layer linear written, in order.
    linears: Vec<String>,
    /// Input-activation bits of every quantized linear written (W8A8), in order.
    act_bits: Vec<Option<u32>>,
    /// GGUF: the mix, its compiled overrides and the tensors written.
    gguf: Option<(GgufState, gguf::Overrides)>,
    /// The PEFT adapter's tensors (`adapter/adapter_model.safetensors`), once a linear has one.
    adapter_writer: Option<SafetensorsWriter>,
    /// (module name, rank) of every adapter written.
    adapters: Vec<(String, usize)>,
    /// How sparse linears are stored (compressed-tensors only).
    sparse_format: SparseFormat,
    /// The further exports of a list, each writing the same layers into its own subfolder.
    also: Vec<(String, Exporter)>,
}

impl ExporterState {
    /// Each spill file and the bytes it must hold.
    pub fn spill_files(&self) -> Vec<(PathBuf, usize)> {
        let mut v = self.writer.spill_files();
        if let Some(a) = &self.adapter_writer {
            v.extend(a.spill_files());
        }
        for (_, _, _, st) in &self.also {
            v.extend(st.spill_files());
        }
        v
    }
}

impl Exporter {
    /// Start writing into `dir` (an empty work folder). Writes the embedding first.
    pub fn begin(
        format: Format,
        dir: &Path,
        ckpt: &Checkpoint,
        max_shard_bytes: usize,
    ) -> Result<Self> {
        let mut e = Exporter {
            format,
            dir: dir.to_path_buf(),
            writer: Some(SafetensorsWriter::new(dir, max_shard_bytes)),
            quantized: Vec::new(),
            unquantized: Vec::new(),
            low_rank: Vec::new(),
            true_sequential: None,
            sparsity: SparsityTally::default(),
            linears: Vec::new(),
            act_bits: Vec::new(),
            gguf: None,
            adapter_writer: None,
            adapters: Vec::new(),
            sparse_format: SparseFormat::Dense,
            also: Vec::new(),
        };
        ensure!(
            format != Format::Gguf,
            "internal: a GGUF export starts with Exporter::begin_gguf"
        );
        e.copy_raw(ckpt, "model.embed_tokens.weight")?;
        Ok(e)
    }

    /// Start a GGUF export into `dir` with mix `file_type` and `--tensor-type`-style overrides.
    /// Tensors are encoded as they arrive and spilled; `finish` writes `model.gguf`.
    pub fn begin_gguf(
        dir: &Path,
        ckpt: &Checkpoint,
        file_type: FileType,
        overrides: Vec<TypeOverride>,
    ) -> Result<Self> {
        gguf::arch_name(&ckpt.config)?;
        let compiled = gguf::Overrides::new(&overrides)?;
        let mut e = Exporter {
            format: Format::Gguf,
            dir: dir.to_path_buf(),
            writer: Some(SafetensorsWriter::new(dir, usize::MAX)),
            quantized: Vec::new(),
            unquantized: Vec::new(),
            low_rank: Vec::new(),
            true_sequential: None,
            sparsity: SparsityTally::default(),
            linears: Vec::new(),
            act_bits: Vec::new(),
            gguf: Some((
                GgufState {
                    file_type,
                    overrides,
                    entries: Vec::new(),
                },
                compiled,
            )),
            adapter_writer: None,
            adapters: Vec::new(),
            sparse_format: SparseFormat::Dense,
            also: Vec::new(),
        };
        e.gguf_copy(ckpt, "model.embed_tokens.weight")?;
        Ok(e)
    }

    /// Flush everything written so far and describe it.
    pub fn checkpoint(&mut self) -> Result<ExporterState> {
        Ok(ExporterState {
            writer: self.w()?.checkpoint()?,
            quantized: self.quantized.clone(),
            unquantized: self.unquantized.clone(),
            low_rank: self.low_rank.clone(),
            true_sequential: self.true_sequential,
            sparsity: self.sparsity.clone(),
            linears: self.linears.clone(),
            act_bits: self.act_bits.clone(),
            gguf: self.gguf.as_ref().map(|(g, _)| g.clone()),
            adapter_writer: self
                .adapter_writer
                .as_mut()
                .map(|w| w.checkpoint())
                .transpose()?,
            adapters: self.adapters.clone(),
            sparse_format: self.sparse_format,
            also: self
                .also
                .iter_mut()
                .map(|(d, e)| {
                    let shard = e.w()?.max_shard_bytes();
                    Ok((d.clone(), e.format, shard, e.checkpoint()?))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Also write every layer as `other` does, into its own folder `dir/<sub>` (the further
    /// exports of a list). `other` was begun in that folder.
    pub fn with_also(mut self, sub: &str, other: Exporter) -> Self {
        self.also.push((sub.to_string(), other));
        self
    }

    /// Continue an interrupted export in `dir` from a checkpoint.
    pub fn resume(
        format: Format,
        dir: &Path,
        max_shard_bytes: usize,
        state: ExporterState,
    ) -> Result<Self> {
        let gguf = match state.gguf {
            Some(g) => {
                let o = gguf::Overrides::new(&g.overrides)?;
                Some((g, o))
            }
            None => None,
        };
        let max_shard_bytes = if gguf.is_some() {
            usize::MAX
        } else {
            max_shard_bytes
        };
        Ok(Exporter {
            format,
            dir: dir.to_path_buf(),
            writer: Some(SafetensorsWriter::resume(
                dir,
                max_shard_bytes,
                state.writer,
            )?),
            quantized: state.quantized,
            unquantized: state.unquantized,
            low_rank: state.low_rank,
            true_sequential: state.true_sequential,
            sparsity: state.sparsity,
            linears: state.linears,
            act_bits: state.act_bits,
            gguf,
            adapter_writer: state
                .adapter_writer
                .map(|st| {
                    SafetensorsWriter::resume(&dir.join(crate::formats::peft::DIR), usize::MAX, st)
                        .map(|w| w.with_stem(crate::formats::peft::STEM))
                })
                .transpose()?,
            adapters: state.adapters,
            sparse_format: state.sparse_format,
            also: state
                .also
                .into_iter()
                .map(|(sub, format, shard, st)| {
                    let e = Exporter::resume(format, &dir.join(&sub), shard, st)?;
                    Ok((sub, e))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Store sparse linears as `format` (compressed-tensors `sparse-bitmask` or dense with
    /// zeros); only compressed-tensors has a bitmask layout.
    pub fn with_sparse_format(mut self, format: SparseFormat) -> Result<Self> {
        ensure!(
            format == SparseFormat::Dense || self.format == Format::CompressedTensors,
            "export: `sparse_format: bitmask` is a compressed-tensors layout; the {} format stores sparse weights dense",
            self.format.name()
        );
        self.sparse_format = format;
        Ok(self)
    }

    /// GGUF: encode one tensor (HF name, HF row-major values and shape) the way llama.cpp's
    /// converter and quantizer lay it out — GGUF name, Q/K rows permuted, the mix's type (1-d
    /// tensors F32) — and spill its bytes.
    fn gguf_add(
        &mut self,
        ckpt: &Checkpoint,
        hf: &str,
        values: Vec<f32>,
        shape: &[usize],
        importance: Option<&[f32]>,
        codes: Option<&crate::model::layer::GgmlCodes>,
    ) -> Result<()> {
        let cfg = &ckpt.config;
        let name = gguf::gguf_name(hf).with_context(|| {
            format!("export: tensor `{hf}` has no GGUF name (llama architecture)")
        })?;
        let (g, overrides) = self.gguf.as_ref().context("internal: not a GGUF export")?;
        let ft = g.file_type;
        let heads = gguf::permute_heads(hf, cfg);
        let values = match (heads, shape) {
            (Some(h), [rows, cols]) => gguf::permute_rows(&values, *rows, *cols, h, false)
                .with_context(|| format!("export: `{hf}`"))?,
            _ => values,
        };
        let ty = match shape {
            [_] => crate::quant::ggml::GgmlType::F32,
            [_, cols] => gguf::tensor_type(
                ft,
                &name,
                *cols,
                cfg.num_layers,
                cfg.tie_word_embeddings,
                importance.is_some() || codes.is_some(),
                overrides,
            ),
            _ => {
                bail!("export: `{hf}` has shape {shape:?}; GGUF export writes 1-d and 2-d tensors")
            }
        };
        let bytes = match (codes, shape) {
            // a pass swept the weight onto this type's grid (gptq_ggml): its blocks as they
            // are, rows in GGUF order
            (Some(c), [rows, _]) => {
                if c.ty != ty {
                    bail!(
                        "export: `{hf}` was encoded as {} by a pass, but this GGUF export gives `{name}` the type {}: run the pass with the export's `gguf_type` (and overrides)",
                        c.ty.name(),
                        ty.name()
                    );
                }
                match heads {
                    Some(h) => permute_byte_rows(&c.bytes, *rows, h)
                        .with_context(|| format!("export: `{hf}`"))?,
                    None => c.bytes.clone(),
                }
            }
            // with an importance matrix (imatrix pass): llama.cpp's weighted encoders, per row
            (None, [_, cols]) if importance.is_some() => crate::quant::ggml::quantize_weighted(
                ty,
                &values,
                *cols,
                importance.unwrap_or_default(),
            )
            .with_context(|| format!("export: encoding `{hf}` as {}", ty.name()))?,
            _ => crate::quant::ggml::quantize(ty, &values)
                .with_context(|| format!("export: encoding `{hf}` as {}", ty.name()))?,
        };
        let dims: Vec<u64> = shape.iter().rev().map(|d| *d as u64).collect();
        self.w()?.add(&name, DType::U8, &[bytes.len()], &bytes)?;
        let (g, _) = self.gguf.as_mut().context("internal: not a GGUF export")?;
        g.entries.push(TensorEntry { name, dims, ty });
        Ok(())
    }

    /// GGUF: a tensor no pass touches (embedding, final norm, LM head), from the source.
    fn gguf_copy(&mut self, ckpt: &Checkpoint, hf: &str) -> Result<()> {
        let shape = ckpt.info(hf)?.0.shape.clone();
        let v = ckpt.f32(hf)?;
        ckpt.release(hf);
        self.gguf_add(ckpt, hf, v, &shape, None, None)
    }

    /// GGUF: assemble `model.gguf` from the spilled tensors (header with the model's and the
    /// tokenizer's metadata, then each tensor aligned to 32 bytes).
    fn gguf_finish(&mut self, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)> {
        self.gguf_copy(ckpt, "model.norm.weight")?;
        if !ckpt.config.tie_word_embeddings {
            self.gguf_copy(ckpt, "lm_head.weight")?;
        }
        let writer = self.writer.take().context("exporter already finished")?;
        let spills = writer.finish_spills()?;
        let (g, _) = self.gguf.as_ref().context("internal: not a GGUF export")?;
        let name = ckpt
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into());
        let mut kv = gguf::model_metadata(&ckpt.config, g.file_type, &name)?;
        kv.extend(gguf::tokenizer_metadata(&ckpt.dir, &ckpt.config)?);
        // where each tensor's bytes are: (spill file, offset)
        let mut at = Vec::new();
        for (si, (_, entries)) in spills.iter().enumerate() {
            let mut off = 0usize;
            for (n, len) in entries {
                at.push((n.clone(), si, off, *len));
                off += len;
            }
        }
        ensure!(
            at.len() == g.entries.len() && at.iter().zip(&g.entries).all(|(a, e)| a.0 == e.name),
            "internal: GGUF spill files do not match the tensors recorded"
        );
        let mut files = Vec::new();
        for (p, _) in &spills {
            files.push(
                std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?,
            );
        }
        let path = self.dir.join(gguf::FILE_NAME);
        gguf::write_file(&path, &kv, &g.entries, |i, out| {
            use std::io::{Read, Seek, SeekFrom};
            let (_, si, off, len) = &at[i];
            let f = &mut files[*si];
            f.seek(SeekFrom::Start(*off as u64))?;
            let copied = std::io::copy(&mut f.take(*len as u64), out)?;
            ensure!(
                copied == *len as u64,
                "spill file {} is short",
                spills[*si].0.display()
            );
            Ok(())
        })?;
        // the spill files stay until the caller has recorded the artifact (resume)
        Ok((
            vec![gguf::FILE_NAME.to_string()],
            spills.into_iter().map(|(p, _)| p).collect(),
        ))
    }

    fn w(&mut self) -> Result<&mut SafetensorsWriter> {
        self.writer.as_mut().context("exporter already finished")
    }

    fn copy_raw(&mut self, ckpt: &Checkpoint, name: &str) -> Result<()> {
        let (info, bytes) = ckpt.raw(name)?;
        let (dtype, shape) = (info.dtype, info.shape.clone());
        self.w()?.add(name, dtype, &shape, bytes)?;
        ckpt.release(name);
        Ok(())
    }

    /// Lay out one linear as its representation says: packed codes (quantized formats), two
    /// factors (`weight_u`, `weight_v`; the `dense` format multiplies them back), or dense
    /// values — copied byte for byte when no pass changed it.
    fn write_linear(&mut self, ckpt: &Checkpoint, prefix: &str, lin: &Linear) -> Result<()> {
        let wname = format!("{prefix}.weight");
        // an adapter is written beside the checkpoint (PEFT LoRA), except by `dense`, which
        // writes the merged matrix
        let separate = lin.adapter().is_some() && self.format != Format::Dense;
        if lin.adapter().is_some() && self.format == Format::Gguf {
            bail!("export: `{prefix}` carries a low-rank adapter (eora); GGUF export has no adapter file: use `format: compressed-tensors` (PEFT adapter beside it) or `dense` (merged)");
        }
        self.sparsity.add(prefix, lin);
        self.linears.push(prefix.to_string());
        if self.format == Format::Gguf {
            if matches!(lin.repr(), Repr::Factored { .. }) {
                bail!("export: `{prefix}` is factored (svd); GGUF stores whole weight matrices: use `format: dense` or drop the low-rank pass");
            }
            if lin.quant().is_some() {
                bail!("export: `{prefix}` was quantized onto an integer grid by a pass; GGUF export encodes the weights onto ggml's grids itself (llama.cpp's reference encoders), so a gguf pipeline runs without rtn/gptq passes");
            }
            if lin.act_quant().is_some() {
                bail!("export: `{prefix}` quantizes its input activations (W8A8); GGUF has no such scheme");
            }
            let w = lin.weight();
            let v = w
                .as_standard_layout()
                .into_owned()
                .into_raw_vec_and_offset()
                .0;
            if lin.ggml().is_none() {
                self.unquantized.push(prefix.to_string());
            }
            let imp = lin.importance().map(|i| i.to_vec());
            let codes = lin.ggml().cloned();
            self.gguf_add(
                ckpt,
                &wname,
                v,
                &[w.nrows(), w.ncols()],
                imp.as_deref(),
                codes.as_ref(),
            )?;
            // attention biases (qwen2; llama's optional ones) as F32 vectors, Q/K permuted
            // as their rows are
            if let Some(b) = &lin.bias {
                self.gguf_add(
                    ckpt,
                    &format!("{prefix}.bias"),
                    b.clone(),
                    &[b.len()],
                    None,
                    None,
                )?;
            }
            return Ok(());
        }
        let bitmask = self.sparse_format == SparseFormat::Bitmask && lin.mask().is_some();
        if bitmask && lin.quant().is_some() {
            bail!("export: `{prefix}` is sparse and quantized; `sparse_format: bitmask` stores unquantized sparse weights (compressed-tensors has no bitmask layout for packed integer weights): use `sparse_format: dense`");
        }
        match (lin.repr(), lin.quant(), self.format) {
            (Repr::Factored { u, v }, _, Format::CompressedTensors | Format::Gptq) => {
                if u.quant.is_some() || v.quant.is_some() {
                    bail!("export: `{prefix}` has quantized factors; this format stores factors in floating point only");
                }
                for (suffix, f) in [("weight_u", u), ("weight_v", v)] {
                    let vals = f.values.as_standard_layout();
                    let bytes = from_f32(lin.dtype, vals.as_slice().context("factor")?);
                    let shape = [f.values.nrows(), f.values.ncols()];
                    self.w()?
                        .add(&format!("{prefix}.{suffix}"), lin.dtype, &shape, &bytes)?;
                }
                self.low_rank.push((prefix.to_string(), u.values.ncols()));
                self.unquantized.push(prefix.to_string());
            }
            (_, None, Format::CompressedTensors) if bitmask => {
                let w = if separate {
                    lin.base_weight()
                } else {
                    lin.weight()
                };
                let s = w.as_slice().context("weight not contiguous")?;
                let dims = (w.nrows(), w.ncols());
                for (n, dt, shape, bytes) in
                    crate::formats::compressed_tensors::bitmask_tensors(prefix, s, dims, lin.dtype)?
                {
                    self.w()?.add(&n, dt, &shape, &bytes)?;
                }
                self.unquantized.push(prefix.to_string());
            }
            (_, Some(q), Format::CompressedTensors) => {
                let act = lin.act_quant().and_then(|a| a.per_token_bits());
                let tensors = match act {
                    Some(_) => {
                        crate::formats::compressed_tensors::int_quantized_tensors(prefix, q)?
                    }
                    None => {
                        crate::formats::compressed_tensors::compressed_tensors_tensors(prefix, q)?
                    }
                };
                for (n, dt, shape, bytes) in tensors {
                    self.w()?.add(&n, dt, &shape, &bytes)?;
                }
                self.act_bits.push(act);
                self.quantized
                    .push((prefix.to_string(), q.args.clone(), Order::of(q)));
            }
            (_, Some(q), Format::Gptq) => {
                let ts = self.true_sequential.unwrap_or(true) && q.true_sequential;
                self.true_sequential = Some(ts);
                for (n, dt, shape, bytes) in crate::formats::gptq::gptq_tensors(prefix, q)? {
                    self.w()?.add(&n, dt, &shape, &bytes)?;
                }
                self.quantized
                    .push((prefix.to_string(), q.args.clone(), Order::of(q)));
            }
            (_, q, _) => {
                if q.is_none() {
                    self.unquantized.push(prefix.to_string());
                }
                if lin.is_modified() || !ckpt.has(&wname) {
                    let w = if separate {
                        lin.base_weight()
                    } else {
                        lin.weight()
                    };
                    let s = w.as_slice().context("weight not contiguous")?;
                    let shape = [w.nrows(), w.ncols()];
                    let bytes = from_f32(lin.dtype, s);
                    self.w()?.add(&wname, lin.dtype, &shape, &bytes)?;
                } else {
                    self.copy_raw(ckpt, &wname)?;
                }
            }
        }
        let bname = format!("{prefix}.bias");
        match (&lin.bias, lin.is_modified()) {
            // a pass may have changed the bias (a folded scale, distillation): write its values
            (Some(b), true) if ckpt.has(&bname) => {
                let dt = ckpt.info(&bname)?.0.dtype;
                let bytes = from_f32(dt, b);
                self.w()?.add(&bname, dt, &[b.len()], &bytes)?;
            }
            _ if ckpt.has(&bname) => self.copy_raw(ckpt, &bname)?,
            _ => {}
        }
        if let (true, Some(ad)) = (separate, lin.adapter()) {
            self.write_adapter(prefix, lin.dtype, ad)?;
        }
        Ok(())
    }

    /// A linear's adapter into `adapter/adapter_model.safetensors`, under PEFT's names.
    fn write_adapter(
        &mut self,
        prefix: &str,
        dtype: DType,
        ad: &crate::model::layer::Adapter,
    ) -> Result<()> {
        use crate::formats::peft;
        if self.adapter_writer.is_none() {
            let d = self.dir.join(peft::DIR);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            self.adapter_writer =
                Some(SafetensorsWriter::new(&d, usize::MAX).with_stem(peft::STEM));
        }
        let w = self
            .adapter_writer
            .as_mut()
            .context("internal: adapter writer")?;
        let (an, bn) = peft::tensor_names(prefix);
        for (name, m) in [(an, &ad.a), (bn, &ad.b)] {
            let v = m.as_standard_layout();
            let bytes = from_f32(dtype, v.as_slice().context("adapter")?);
            w.add(&name, dtype, &[m.nrows(), m.ncols()], &bytes)?;
        }
        self.adapters.push((prefix.to_string(), ad.rank()));
        Ok(())
    }

    /// Write the tail (final norm, LM head), config.json with its quantization block, the
    /// tokenizer and side files. Returns the names of the files written and the spill files
    /// to remove once the caller has recorded the artifact as complete
    /// ([`writer::remove_spills`]).
    pub fn finish(mut self, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)> {
        let also = std::mem::take(&mut self.also);
        let (mut files, mut spills) = self.finish_one(ckpt)?;
        for (sub, e) in also {
            let (f, s) = e.finish_one(ckpt)?;
            files.extend(f.into_iter().map(|f| format!("{sub}/{f}")));
            spills.extend(s);
        }
        Ok((files, spills))
    }

    fn finish_one(mut self, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)> {
        if self.format == Format::Gguf {
            let (mut files, spills) = self.gguf_finish(ckpt)?;
            // config.json and the tokenizer beside the GGUF file: `compress eval` / `inspect`
            // read the folder (the GGUF file alone is what llama.cpp loads)
            let p = self.dir.join("config.json");
            std::fs::write(&p, serde_json::to_vec_pretty(&ckpt.config.raw)?)
                .with_context(|| format!("cannot write {}", p.display()))?;
            files.push("config.json".into());
            files.extend(self.copy_side_files(ckpt)?);
            return Ok((files, spills));
        }
        self.copy_raw(ckpt, "model.norm.weight")?;
        if ckpt.has("lm_head.weight") {
            self.copy_raw(ckpt, "lm_head.weight")?;
        }
        let writer = self.writer.take().context("exporter already finished")?;
        let (mut files, spills) = writer.finish()?;
        let mut config = ckpt.config.raw.clone();
        match self.format {
            Format::Dense | Format::Gguf => {}
            Format::CompressedTensors => {
                let sparsity = self.sparsity.block(&self.linears, self.sparse_format);
                match (self.compressed_tensors_config()?, sparsity) {
                    (Some(mut q), s) => {
                        if let Some(s) = s {
                            q["sparsity_config"] = s;
                        }
                        config["quantization_config"] = q;
                    }
                    // bitmask-compressed weights need the library's decompressor, which reads
                    // the block inside `quantization_config` (ModelCompressor's
                    // `parse_sparsity_config`)
                    (None, Some(s)) if self.sparse_format == SparseFormat::Bitmask => {
                        config["quantization_config"] = serde_json::json!({
                            "quant_method": "compressed-tensors",
                            "sparsity_config": s,
                        });
                    }
                    // dense weights with exact zeros load everywhere; a quantization_config
                    // without config groups would make transformers refuse the checkpoint,
                    // so the metadata goes at the top level
                    (None, Some(s)) => config["sparsity_config"] = s,
                    (None, None) => {}
                }
            }
            Format::Gptq => {
                if let Some(q) = self.gptq_config()? {
                    config["quantization_config"] = q.clone();
                    let p = self.dir.join("quantize_config.json");
                    std::fs::write(&p, serde_json::to_vec_pretty(&q)?)
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    files.push("quantize_config.json".into());
                }
            }
        }
        if !self.low_rank.is_empty() {
            let ranks: serde_json::Map<String, Value> = self
                .low_rank
                .iter()
                .map(|(m, r)| (m.clone(), Value::from(*r)))
                .collect();
            config["low_rank"] = serde_json::json!({
                "layout": "weight_u [out, rank] · weight_v [rank, in]",
                "ranks": ranks,
            });
        }
        let p = self.dir.join("config.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
        files.push("config.json".into());
        files.extend(self.copy_side_files(ckpt)?);
        let mut spills = spills;
        if let Some(w) = self.adapter_writer.take() {
            use crate::formats::peft;
            let (afiles, aspills) = w.finish()?;
            files.extend(afiles.into_iter().map(|f| format!("{}/{f}", peft::DIR)));
            spills.extend(aspills);
            // the base model is the quantized checkpoint in the folder above
            let cfg = peft::adapter_config(&self.adapters, "..")?;
            let p = self.dir.join(peft::DIR).join(peft::CONFIG);
            std::fs::write(&p, serde_json::to_vec_pretty(&cfg)?)
                .with_context(|| format!("cannot write {}", p.display()))?;
            files.push(format!("{}/{}", peft::DIR, peft::CONFIG));
        }
        Ok((files, spills))
    }

    fn copy_side_files(&self, ckpt: &Checkpoint) -> Result<Vec<String>> {
        let mut files = Vec::new();
        for f in SIDE_FILES {
            let src = ckpt.dir.join(f);
            if src.is_file() {
                let dst = self.dir.join(f);
                let bytes = std::fs::read(&src)
                    .with_context(|| format!("cannot read {}", src.display()))?;
                std::fs::write(&dst, bytes)
                    .with_context(|| format!("cannot write {}", dst.display()))?;
                files.push(f.to_string());
            }
        }
        Ok(files)
    }

    fn distinct_args(&self) -> Result<Option<(QuantArgs, Order)>> {
        let Some((_, first, order)) = self.quantized.first() else {
            return Ok(None);
        };
        for (name, a, o) in &self.quantized {
            if a != first || o != order {
                bail!("export: linear `{name}` uses a different quantization scheme or column order than the others; one scheme per checkpoint is supported");
            }
        }
        Ok(Some((first.clone(), *order)))
    }

    /// The `quantization_config` block compressed-tensors (and so vLLM) reads.
    fn compressed_tensors_config(&self) -> Result<Option<Value>> {
        if self.act_bits.windows(2).any(|w| w[0] != w[1]) {
            bail!("export: some quantized linears quantize their input activations and others do not; one scheme per checkpoint is supported");
        }
        Ok(self.distinct_args()?.map(|(a, order)| {
            crate::formats::compressed_tensors::quantization_config(
                &a,
                order,
                &self.unquantized,
                self.act_bits.first().copied().flatten(),
            )
        }))
    }

    /// quantize_config.json / `quantization_config` of a GPTQ v1 checkpoint.
    fn gptq_config(&self) -> Result<Option<Value>> {
        self.distinct_args()?
            .map(|(a, order)| {
                crate::formats::gptq::quantize_config(
                    &a,
                    order,
                    &self.unquantized,
                    self.true_sequential.unwrap_or(false),
                )
            })
            .transpose()
    }
}

impl LayerSink for Exporter {
    fn layer(&mut self, ckpt: &Checkpoint, layer: &LayerWeights) -> Result<()> {
        self.layer_one(ckpt, layer)?;
        for (sub, e) in &mut self.also {
            e.layer_one(ckpt, layer)
                .with_context(|| format!("export into `{sub}`"))?;
        }
        Ok(())
    }
}

impl Exporter {
    fn layer_one(&mut self, ckpt: &Checkpoint, layer: &LayerWeights) -> Result<()> {
        let p = LayerWeights::prefix(layer.index);
        if self.format == Format::Gguf {
            for (n, (v, _)) in &layer.norms {
                let name = format!("{p}{n}.weight");
                self.gguf_add(ckpt, &name, v.clone(), &[v.len()], None, None)?;
            }
            for (n, lin) in &layer.linears {
                self.write_linear(ckpt, &format!("{p}{n}"), lin)?;
            }
            return Ok(());
        }
        // Tensors in the source's name order keeps identity output layouts stable.
        for (n, (v, dt)) in &layer.norms {
            let name = format!("{p}{n}.weight");
            if layer.norms_modified {
                let bytes = from_f32(*dt, v);
                self.w()?.add(&name, *dt, &[v.len()], &bytes)?;
            } else {
                self.copy_raw(ckpt, &name)?;
            }
        }
        for (n, lin) in &layer.linears {
            self.write_linear(ckpt, &format!("{p}{n}"), lin)?;
        }
        Ok(())
    }
}

pub use crate::quant::scale_dtype_for;

/// The rows of an encoded [rows, cols] matrix (each row a whole number of blocks) in the order
/// llama.cpp's converter permutes Q/K rows (`gguf::permute_rows`).
fn permute_byte_rows(bytes: &[u8], rows: usize, n_head: usize) -> Result<Vec<u8>> {
    ensure!(
        rows > 0 && bytes.len().is_multiple_of(rows),
        "{} bytes do not split into {rows} rows",
        bytes.len()
    );
    let per = bytes.len() / rows;
    // where each GGUF row comes from: permute the row indices themselves
    let idx: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    let order = gguf::permute_rows(&idx, rows, 1, n_head, false)?;
    Ok(order
        .iter()
        .flat_map(|r| &bytes[*r as usize * per..(*r as usize + 1) * per])
        .copied()
        .collect())
}
