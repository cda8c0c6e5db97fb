//! The GGUF side of an export: each tensor encoded onto its ggml type and spilled as it
//! arrives, then `model.gguf` assembled from the spill files at the end.

use super::state::Pending;
use super::Exporter;
use crate::formats::gguf::{self, TensorEntry};
use crate::model::Checkpoint;
use crate::model::DType;
use anyhow::{bail, ensure, Context, Result};
use std::path::PathBuf;

impl Exporter {
    /// GGUF: encode one tensor (HF name, HF row-major values and shape) the way llama.cpp's
    /// converter and quantizer lay it out — GGUF name, Q/K rows permuted, the mix's type (1-d
    /// tensors F32) — and spill its bytes.
    pub(super) fn gguf_add(
        &mut self,
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
                let (g, _) = self.gguf.as_mut().context("internal: not a GGUF export")?;
                let p = g.pending.entry(name.clone()).or_insert_with(|| Pending {
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
                let p = g.pending.remove(&name).context("internal: pending stack")?;
                dims.push(n as u64);
                p.parts.into_iter().flatten().flatten().collect()
            }
        };
        self.w()?.add(&name, DType::U8, &[bytes.len()], &bytes)?;
        let (g, _) = self.gguf.as_mut().context("internal: not a GGUF export")?;
        g.entries.push(TensorEntry { name, dims, ty });
        Ok(())
    }

    /// GGUF: every stacked expert tensor begun in a layer was completed in it.
    pub(super) fn gguf_layer_done(&self, layer: usize) -> Result<()> {
        let (g, _) = self.gguf.as_ref().context("internal: not a GGUF export")?;
        ensure!(
            g.pending.is_empty(),
            "export: layer {layer}: the stacked expert tensors {:?} are missing experts",
            g.pending.keys().collect::<Vec<_>>()
        );
        Ok(())
    }

    /// GGUF: a tensor no pass touches (embedding, final norm, LM head), from the source.
    pub(super) fn gguf_copy(&mut self, ckpt: &Checkpoint, hf: &str) -> Result<()> {
        let shape = ckpt.info(hf)?.0.shape.clone();
        let v = ckpt.f32(hf)?;
        ckpt.release(hf);
        self.gguf_add(ckpt, hf, v, &shape, None, None)
    }

    /// GGUF: assemble `model.gguf` from the spilled tensors (header with the model's and the
    /// tokenizer's metadata, then each tensor aligned to 32 bytes).
    pub(super) fn gguf_finish(&mut self, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)> {
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
