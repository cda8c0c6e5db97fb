//! What every format writes into ([`Out`]): the streaming safetensors (or spill) file, the
//! PEFT adapter beside it, and the tallies the config blocks are made from; with the layouts
//! the safetensors formats share — a raw copy, a dense weight, two factors, a bias, an
//! adapter — and their common end (tail tensors, config.json, side files).

use super::writer::SafetensorsWriter;
use crate::formats::compressed_tensors::SparseFormat;
use crate::model::layer::{Factor, Linear};
use crate::model::Checkpoint;
use crate::model::DType;
use crate::safetensors_file::from_f32;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// Files copied unchanged from the model folder besides the weights.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
];

/// The output of one export, shared by every format's writer.
pub struct Out {
    pub(super) dir: PathBuf,
    pub(super) writer: Option<SafetensorsWriter>,
    /// Every decoder-layer linear written, in order.
    pub(super) linears: Vec<String>,
    pub(super) sparsity: SparsityTally,
    /// (module name, rank) of every linear written as two factors.
    pub(super) low_rank: Vec<(String, usize)>,
    /// The PEFT adapter's tensors (`adapter/adapter_model.safetensors`), once a linear has one.
    pub(super) adapter_writer: Option<SafetensorsWriter>,
    /// (module name, rank) of every adapter written.
    pub(super) adapters: Vec<(String, usize)>,
}

impl Out {
    pub(super) fn new(dir: PathBuf, writer: SafetensorsWriter) -> Self {
        Out {
            dir,
            writer: Some(writer),
            linears: Vec::new(),
            sparsity: SparsityTally::default(),
            low_rank: Vec::new(),
            adapter_writer: None,
            adapters: Vec::new(),
        }
    }

    pub(super) fn w(&mut self) -> Result<&mut SafetensorsWriter> {
        self.writer.as_mut().context("exporter already finished")
    }

    /// A tensor no pass changed, byte for byte from the source.
    pub(super) fn copy_raw(&mut self, ckpt: &Checkpoint, name: &str) -> Result<()> {
        let (info, bytes) = ckpt.raw(name)?;
        let (dtype, shape) = (info.dtype, info.shape.clone());
        self.w()?.add(name, dtype, &shape, bytes)?;
        ckpt.release(name);
        Ok(())
    }

    /// A layer's norms: their values when a pass changed them, else copied.
    pub(super) fn norms(
        &mut self,
        ckpt: &Checkpoint,
        layer: &crate::model::layer::LayerWeights,
    ) -> Result<()> {
        let p = crate::model::layer::LayerWeights::prefix(layer.index);
        // tensors in the source's name order keep identity output layouts stable
        for (n, (v, dt)) in &layer.norms {
            let name = format!("{p}{n}.weight");
            if layer.norms_modified {
                let bytes = from_f32(*dt, v);
                self.w()?.add(&name, *dt, &[v.len()], &bytes)?;
            } else {
                self.copy_raw(ckpt, &name)?;
            }
        }
        Ok(())
    }

    /// A linear's weight in its dtype (`base`: without its adapter, which is written beside),
    /// copied byte for byte when no pass changed it.
    pub(super) fn dense_weight(
        &mut self,
        ckpt: &Checkpoint,
        prefix: &str,
        lin: &Linear,
        base: bool,
    ) -> Result<()> {
        let wname = format!("{prefix}.weight");
        if lin.is_modified() || !ckpt.has(&wname) {
            let w = if base {
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
        Ok(())
    }

    /// A factored linear as `weight_u` [out, rank] and `weight_v` [rank, in] in its dtype.
    pub(super) fn factors(
        &mut self,
        prefix: &str,
        lin: &Linear,
        u: &Factor,
        v: &Factor,
    ) -> Result<()> {
        if u.quant.is_some() || v.quant.is_some() {
            anyhow::bail!("export: `{prefix}` has quantized factors; this format stores factors in floating point only");
        }
        for (suffix, f) in [("weight_u", u), ("weight_v", v)] {
            let vals = f.values.as_standard_layout();
            let bytes = from_f32(lin.dtype, vals.as_slice().context("factor")?);
            let shape = [f.values.nrows(), f.values.ncols()];
            self.w()?
                .add(&format!("{prefix}.{suffix}"), lin.dtype, &shape, &bytes)?;
        }
        self.low_rank.push((prefix.to_string(), u.values.ncols()));
        Ok(())
    }

    /// A linear's bias (its values when a pass changed it, else copied) and, when `adapter`,
    /// its PEFT adapter beside the checkpoint.
    pub(super) fn bias_and_adapter(
        &mut self,
        ckpt: &Checkpoint,
        prefix: &str,
        lin: &Linear,
        adapter: bool,
    ) -> Result<()> {
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
        if let (true, Some(ad)) = (adapter, lin.adapter()) {
            self.adapter(prefix, lin.dtype, ad)?;
        }
        Ok(())
    }

    /// A linear's adapter into `adapter/adapter_model.safetensors`, under PEFT's names.
    fn adapter(
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

    /// The end of a safetensors export: the tail (final norm, LM head), the shards,
    /// config.json (the format's blocks added by `blocks`, then the low-rank block), the side
    /// files and the adapter's config. Returns the files written and the spill files.
    pub(super) fn finish_safetensors(
        &mut self,
        ckpt: &Checkpoint,
        blocks: impl FnOnce(&Out, &mut Value, &mut Vec<String>) -> Result<()>,
    ) -> Result<(Vec<String>, Vec<PathBuf>)> {
        self.copy_raw(ckpt, "model.norm.weight")?;
        if ckpt.has("lm_head.weight") {
            self.copy_raw(ckpt, "lm_head.weight")?;
        }
        let writer = self.writer.take().context("exporter already finished")?;
        let (mut files, mut spills) = writer.finish()?;
        let mut config = ckpt.config.raw.clone();
        blocks(self, &mut config, &mut files)?;
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
        self.write_json("config.json", &config, &mut files)?;
        files.extend(self.copy_side_files(ckpt)?);
        if let Some(w) = self.adapter_writer.take() {
            use crate::formats::peft;
            let (afiles, aspills) = w.finish()?;
            files.extend(afiles.into_iter().map(|f| format!("{}/{f}", peft::DIR)));
            spills.extend(aspills);
            // the base model is the quantized checkpoint in the folder above
            let cfg = peft::adapter_config(&self.adapters, "..")?;
            self.write_json(&format!("{}/{}", peft::DIR, peft::CONFIG), &cfg, &mut files)?;
        }
        Ok((files, spills))
    }

    /// Write `value` as pretty JSON to `name` in the output folder and list it.
    pub(super) fn write_json(
        &self,
        name: &str,
        value: &Value,
        files: &mut Vec<String>,
    ) -> Result<()> {
        let p = self.dir.join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
        files.push(name.to_string());
        Ok(())
    }

    /// The tokenizer and the other side files, copied from the model folder.
    pub(super) fn copy_side_files(&self, ckpt: &Checkpoint) -> Result<Vec<String>> {
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
    pub(super) fn add(&mut self, prefix: &str, lin: &Linear) {
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
    pub(super) fn block(&self, all_linears: &[String], format: SparseFormat) -> Option<Value> {
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
