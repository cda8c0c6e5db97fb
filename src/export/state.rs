//! What an export has written so far, serialized for resuming: the exporter's state (with its
//! format writer's own tally) and the checkpoint / resume round trip of an
//! [`Exporter`].

use super::out::{Out, SparsityTally};
use super::writer::{self, SafetensorsWriter};
use super::Exporter;
use crate::formats::Format;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// An exporter's progress, for resuming.
#[derive(Clone, Serialize, Deserialize)]
pub struct ExporterState {
    writer: writer::WriterState,
    format: Format,
    /// What the format's writer tallied (its own JSON).
    #[serde(default)]
    tally: Value,
    #[serde(default)]
    low_rank: Vec<(String, usize)>,
    #[serde(default)]
    sparsity: SparsityTally,
    #[serde(default)]
    linears: Vec<String>,
    #[serde(default)]
    adapter_writer: Option<writer::WriterState>,
    #[serde(default)]
    adapters: Vec<(String, usize)>,
    /// The further exports of a list (subfolder, largest shard, state).
    #[serde(default)]
    also: Vec<(String, usize, ExporterState)>,
}

impl ExporterState {
    /// Each spill file and the bytes it must hold.
    pub fn spill_files(&self) -> Vec<(PathBuf, usize)> {
        let mut v = self.writer.spill_files();
        if let Some(a) = &self.adapter_writer {
            v.extend(a.spill_files());
        }
        for (_, _, st) in &self.also {
            v.extend(st.spill_files());
        }
        v
    }
}

impl Exporter {
    /// Flush everything written so far and describe it.
    pub fn checkpoint(&mut self) -> Result<ExporterState> {
        let out = &mut self.out;
        Ok(ExporterState {
            writer: out.w()?.checkpoint()?,
            format: self.fmt.format(),
            tally: self.fmt.state()?,
            low_rank: out.low_rank.clone(),
            sparsity: out.sparsity.clone(),
            linears: out.linears.clone(),
            adapter_writer: out
                .adapter_writer
                .as_mut()
                .map(|w| w.checkpoint())
                .transpose()?,
            adapters: out.adapters.clone(),
            also: self
                .also
                .iter_mut()
                .map(|(d, e)| {
                    let shard = e.out.w()?.max_shard_bytes();
                    Ok((d.clone(), shard, e.checkpoint()?))
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
        ensure!(
            format == state.format,
            "the resume state was written by a {} export, not {}",
            state.format.name(),
            format.name()
        );
        let fmt = super::writer_for(format, Some(state.tally))?;
        let max_shard_bytes = if format == Format::Gguf {
            usize::MAX
        } else {
            max_shard_bytes
        };
        let mut out = Out::new(
            dir.to_path_buf(),
            SafetensorsWriter::resume(dir, max_shard_bytes, state.writer)?,
        );
        out.low_rank = state.low_rank;
        out.sparsity = state.sparsity;
        out.linears = state.linears;
        out.adapters = state.adapters;
        out.adapter_writer = state
            .adapter_writer
            .map(|st| {
                SafetensorsWriter::resume(&dir.join(crate::formats::peft::DIR), usize::MAX, st)
                    .map(|w| w.with_stem(crate::formats::peft::STEM))
            })
            .transpose()?;
        Ok(Exporter {
            out,
            fmt,
            also: state
                .also
                .into_iter()
                .map(|(sub, shard, st)| {
                    let e = Exporter::resume(st.format, &dir.join(&sub), shard, st)?;
                    Ok((sub, e))
                })
                .collect::<Result<_>>()?,
        })
    }
}
