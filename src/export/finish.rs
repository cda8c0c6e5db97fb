//! The end of an export: the tail tensors, config.json with each format's quantization and
//! sparsity blocks, the PEFT adapter config and the side files copied from the model folder.

use super::Exporter;
use crate::formats::compressed_tensors::SparseFormat;
use crate::formats::{Format, Order};
use crate::model::Checkpoint;
use crate::quant::QuantArgs;
use anyhow::{bail, Context, Result};
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

impl Exporter {
    /// Write the tail (final norm, LM head), config.json with its quantization block, the
    /// tokenizer and side files. Returns the names of the files written and the spill files
    /// to remove once the caller has recorded the artifact as complete
    /// ([`super::writer::remove_spills`]).
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
                bail!("export: linear `{name}` uses a different quantization scheme or column order than the others; a GPTQ v1 checkpoint has one scheme (mixed schemes, as a size budget writes: `format: compressed-tensors`)");
            }
        }
        Ok(Some((first.clone(), *order)))
    }

    /// The `quantization_config` block compressed-tensors (and so vLLM) reads: one config
    /// group targeting `Linear` when every quantized linear has the same scheme, else one group
    /// per scheme (in order of first use) naming its modules.
    fn compressed_tensors_config(&self) -> Result<Option<Value>> {
        use crate::formats::compressed_tensors::{quantization_config_groups, ConfigGroup};
        let mut groups: Vec<ConfigGroup> = Vec::new();
        for (i, (name, a, order)) in self.quantized.iter().enumerate() {
            let input = self.inputs.get(i).cloned().flatten();
            match groups
                .iter_mut()
                .find(|g| g.args == *a && g.order == *order && g.input == input)
            {
                Some(g) => g.targets.push(name.clone()),
                None => groups.push(ConfigGroup {
                    args: a.clone(),
                    order: *order,
                    input,
                    targets: vec![name.clone()],
                }),
            }
        }
        if groups.is_empty() {
            return Ok(None);
        }
        if let [g] = groups.as_mut_slice() {
            g.targets = vec!["Linear".into()];
        }
        Ok(Some(quantization_config_groups(&groups, &self.unquantized)))
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
