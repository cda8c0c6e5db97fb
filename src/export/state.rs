//! What an export has written so far, serialized for resuming: the exporter's state, the GGUF
//! and sparsity tallies, and the checkpoint / resume round trip of an [`Exporter`].

use super::writer::{self, SafetensorsWriter};
use super::Exporter;
use crate::formats::compressed_tensors::SparseFormat;
use crate::formats::gguf::{self, FileType, TensorEntry, TypeOverride};
use crate::formats::{Format, Order};
use crate::model::layer::Linear;
use crate::quant::QuantArgs;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

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
    inputs: Vec<Option<crate::quant::QuantArgs>>,
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
    pub(super) entries: Vec<TensorEntry>,
    /// A mixture's stacked expert tensors being filled within the current layer (empty
    /// between layers, where a resume starts).
    #[serde(skip)]
    pub(super) pending: std::collections::BTreeMap<String, Pending>,
}

/// A stacked expert tensor being filled: each expert's encoded rows, its dims and type.
#[derive(Clone)]
pub(super) struct Pending {
    pub parts: Vec<Option<Vec<u8>>>,
    pub dims: Vec<u64>,
    pub ty: crate::quant::ggml::GgmlType,
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
            inputs: self.inputs.clone(),
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
            inputs: state.inputs,
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
}
