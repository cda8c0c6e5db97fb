//! The GGUF side of an export: each tensor encoded onto its ggml type and spilled as it
//! arrives, then `model.gguf` assembled from the spill files at the end.

use super::out::Out;
use super::FormatWriter;
use crate::formats::gguf::{self, FileType, TensorEntry, TypeOverride};
use crate::formats::Format;
use crate::model::layer::{LayerWeights, Linear, Repr};
use crate::model::Checkpoint;
use crate::model::DType;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// What a GGUF export needs besides the spill file: the mix, the overrides, and every tensor
/// written so far (GGUF name, dims, ggml type), in order.
#[derive(Clone, Serialize, Deserialize)]
struct State {
    file_type: FileType,
    overrides: Vec<TypeOverride>,
    entries: Vec<TensorEntry>,
}

/// A stacked expert tensor being filled: each expert's encoded rows, its dims and type.
struct Pending {
    parts: Vec<Option<Vec<u8>>>,
    dims: Vec<u64>,
    ty: crate::quant::ggml::GgmlType,
}

pub(super) struct Writer {
    st: State,
    /// The overrides compiled.
    overrides: gguf::Overrides,
    /// A mixture's stacked expert tensors being filled within the current layer (empty
    /// between layers, where a resume starts).
    pending: std::collections::BTreeMap<String, Pending>,
}

impl Writer {
    pub(super) fn new(
        ckpt: &Checkpoint,
        file_type: FileType,
        overrides: Vec<TypeOverride>,
    ) -> Result<Self> {
        gguf::arch_name(&ckpt.config)?;
        gguf::check_mixture(&ckpt.config)?;
        Self::from_state(State {
            file_type,
            overrides,
            entries: Vec::new(),
        })
    }

    pub(super) fn restore(state: Value) -> Result<Self> {
        Self::from_state(serde_json::from_value(state).context("internal: GGUF export state")?)
    }

    fn from_state(st: State) -> Result<Self> {
        Ok(Writer {
            overrides: gguf::Overrides::new(&st.overrides)?,
            st,
            pending: Default::default(),
        })
    }
}

impl FormatWriter for Writer {
    fn format(&self) -> Format {
        Format::Gguf
    }

    fn begin(&mut self, out: &mut Out, ckpt: &Checkpoint) -> Result<()> {
        self.copy(out, ckpt, "model.embed_tokens.weight")
    }

    fn layer(&mut self, out: &mut Out, ckpt: &Checkpoint, layer: &LayerWeights) -> Result<()> {
        let p = LayerWeights::prefix(layer.index);
        for (n, (v, _)) in &layer.norms {
            let name = format!("{p}{n}.weight");
            self.add(out, ckpt, &name, v.clone(), &[v.len()], None, None)?;
        }
        for (n, lin) in &layer.linears {
            super::write_linear(self, out, ckpt, &format!("{p}{n}"), lin)?;
        }
        self.layer_done(layer.index)
    }

    fn linear(
        &mut self,
        out: &mut Out,
        ckpt: &Checkpoint,
        prefix: &str,
        lin: &Linear,
    ) -> Result<()> {
        if lin.adapter().is_some() {
            bail!("export: `{prefix}` carries a low-rank adapter (eora); GGUF export has no adapter file: use `format: compressed-tensors` (PEFT adapter beside it) or `dense` (merged)");
        }
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
        let imp = lin.importance().map(|i| i.to_vec());
        let codes = lin.ggml().cloned();
        let shape = [w.nrows(), w.ncols()];
        let wname = format!("{prefix}.weight");
        self.add(out, ckpt, &wname, v, &shape, imp.as_deref(), codes.as_ref())?;
        // attention biases (qwen2; llama's optional ones) as F32 vectors, Q/K permuted
        // as their rows are
        if let Some(b) = &lin.bias {
            let bname = format!("{prefix}.bias");
            self.add(out, ckpt, &bname, b.clone(), &[b.len()], None, None)?;
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Out, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)> {
        let (mut files, spills) = self.assemble(out, ckpt)?;
        // config.json and the tokenizer beside the GGUF file: `compress eval` / `inspect`
        // read the folder (the GGUF file alone is what llama.cpp loads)
        out.write_json("config.json", &ckpt.config.raw, &mut files)?;
        files.extend(out.copy_side_files(ckpt)?);
        Ok((files, spills))
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::to_value(&self.st)?)
    }
}

impl Writer {
    /// GGUF: encode one tensor (HF name, HF row-major values and shape) the way llama.cpp's
    /// converter and quantizer lay it out — GGUF name, Q/K rows permuted, the mix's type (1-d
    /// tensors F32) — and spill its bytes.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        out: &mut Out,
        ckpt: &Checkpoint,
        hf: &str,
        values: Vec<f32>,
        shape: &[usize],
        importance: Option<&[f32]>,
        codes: Option<&crate::model::layer::GgmlCodes>,
    ) -> Result<()> {
        let cfg = &ckpt.config;
        let (name, expert) = gguf::gguf_slot(hf).with_context(|| {
            format!("export: tensor `{hf}` has no GGUF name (llama architecture)")
        })?;
        // Qwen2-MoE's shared-expert gate, [1, hidden], is a vector in llama.cpp's layout
        let flat = [shape.iter().product::<usize>()];
        let shape = if gguf::squeezed(hf) { &flat[..] } else { shape };
        let overrides = &self.overrides;
        let ft = self.st.file_type;
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
                gguf::MixModel::of(cfg),
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
        let mut dims: Vec<u64> = shape.iter().rev().map(|d| *d as u64).collect();
        let bytes = match expert {
            None => bytes,
            Some(e) => {
                // one expert of a stacked tensor: kept until every expert of it has arrived
                // (all within one layer), then written as [experts, rows, cols], expert E's
                // encoded rows at index E
                let n = cfg.moe.map_or(0, |m| m.experts);
                let p = self.pending.entry(name.clone()).or_insert_with(|| Pending {
                    parts: vec![None; n],
                    dims: dims.clone(),
                    ty,
                });
                ensure!(
                    e < n && p.dims == dims && p.ty == ty && p.parts[e].is_none(),
                    "export: `{hf}` does not fit the stacked tensor `{name}` ({} experts of {:?} as {})",
                    n,
                    p.dims,
                    p.ty.name()
                );
                p.parts[e] = Some(bytes);
                if p.parts.iter().any(Option::is_none) {
                    return Ok(());
                }
                let p = self
                    .pending
                    .remove(&name)
                    .context("internal: pending stack")?;
                dims.push(n as u64);
                p.parts.into_iter().flatten().flatten().collect()
            }
        };
        out.w()?.add(&name, DType::U8, &[bytes.len()], &bytes)?;
        self.st.entries.push(TensorEntry { name, dims, ty });
        Ok(())
    }

    /// GGUF: every stacked expert tensor begun in a layer was completed in it.
    fn layer_done(&self, layer: usize) -> Result<()> {
        ensure!(
            self.pending.is_empty(),
            "export: layer {layer}: the stacked expert tensors {:?} are missing experts",
            self.pending.keys().collect::<Vec<_>>()
        );
        Ok(())
    }

    /// GGUF: a tensor no pass touches (embedding, final norm, LM head), from the source.
    fn copy(&mut self, out: &mut Out, ckpt: &Checkpoint, hf: &str) -> Result<()> {
        let shape = ckpt.info(hf)?.0.shape.clone();
        let v = ckpt.f32(hf)?;
        ckpt.release(hf);
        self.add(out, ckpt, hf, v, &shape, None, None)
    }

    /// GGUF: assemble `model.gguf` from the spilled tensors (header with the model's and the
    /// tokenizer's metadata, then each tensor aligned to 32 bytes).
    fn assemble(
        &mut self,
        out: &mut Out,
        ckpt: &Checkpoint,
    ) -> Result<(Vec<String>, Vec<PathBuf>)> {
        self.copy(out, ckpt, "model.norm.weight")?;
        if !ckpt.config.tie_word_embeddings {
            self.copy(out, ckpt, "lm_head.weight")?;
        }
        let writer = out.writer.take().context("exporter already finished")?;
        let spills = writer.finish_spills()?;
        let g = &self.st;
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
        let path = out.dir.join(gguf::FILE_NAME);
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
}

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
