//! Writers of compressed checkpoints. An exporter only lays out bytes: it never runs an
//! algorithm. Tensors that no pass changed are copied byte for byte from the source.
//!
//! Each format is one [`FormatWriter`] in its own file (`dense.rs`, `compressed_tensors.rs`,
//! `gptq.rs`, `gguf.rs`; its names, config blocks and readers in `formats/<format>`); the
//! [`Exporter`] drives a list of them (several exports from one run) over what they share
//! ([`out::Out`]: the streaming file, the adapter, the tallies). Adding a format is a writer
//! file and its line in [`writer_for`].

mod compressed_tensors;
mod dense;
mod gguf;
mod gptq;
mod linear;
mod out;
mod state;
pub mod writer;

use crate::engine::LayerSink;
use crate::model::layer::{LayerWeights, Linear};
use crate::model::Checkpoint;
use anyhow::{bail, Context, Result};
use out::Out;
use serde_json::Value;
use std::path::{Path, PathBuf};
use writer::SafetensorsWriter;

use crate::formats::gguf::{FileType, TypeOverride};

pub use crate::formats::compressed_tensors::SparseFormat;
pub use crate::formats::{Format, Order};
pub use linear::quantized_bytes;
pub use out::SparsityTally;
pub use state::ExporterState;

/// One export format: how it lays out a layer and each linear, and how it ends (config blocks,
/// container). It writes through [`Out`]; what it tallies for its config blocks is its own
/// state, saved and restored for resume as JSON.
pub(crate) trait FormatWriter: Send {
    fn format(&self) -> Format;

    /// The tensors before the layers (the embedding).
    fn begin(&mut self, out: &mut Out, ckpt: &Checkpoint) -> Result<()> {
        out.copy_raw(ckpt, "model.embed_tokens.weight")
    }

    /// One finished decoder layer: its norms, then its linears.
    fn layer(&mut self, out: &mut Out, ckpt: &Checkpoint, layer: &LayerWeights) -> Result<()> {
        out.norms(ckpt, layer)?;
        let p = LayerWeights::prefix(layer.index);
        for (n, lin) in &layer.linears {
            write_linear(self, out, ckpt, &format!("{p}{n}"), lin)?;
        }
        Ok(())
    }

    /// One decoder linear (`prefix`: its module name) as its representation says.
    fn linear(
        &mut self,
        out: &mut Out,
        ckpt: &Checkpoint,
        prefix: &str,
        lin: &Linear,
    ) -> Result<()>;

    /// The tensors a quantized linear is stored as (packed formats only).
    fn packed(
        &self,
        prefix: &str,
        _q: &crate::quant::QuantizedLinear,
        _input: Option<&crate::quant::QuantArgs>,
    ) -> Result<Vec<crate::formats::NamedTensor>> {
        bail!(
            "format `{}` stores no packed linears (`{prefix}`)",
            self.format().name()
        )
    }

    /// Store sparse linears as `format`; only compressed-tensors has a bitmask layout.
    fn set_sparse_format(&mut self, format: SparseFormat) -> Result<()> {
        if format != SparseFormat::Dense {
            bail!(
                "export: `sparse_format: bitmask` is a compressed-tensors layout; the {} format stores sparse weights dense",
                self.format().name()
            );
        }
        Ok(())
    }

    /// The end: the tail tensors, the container or config.json with this format's blocks, the
    /// side files. Returns the files written and the spill files to remove later.
    fn finish(&mut self, out: &mut Out, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)>;

    /// What this writer has tallied, for resuming.
    fn state(&self) -> Result<Value>;
}

/// The writer of `format`, fresh (`state: None`) or as a checkpoint left it. The list of
/// formats; GGUF starts with [`Exporter::begin_gguf`] (its mix) and resumes from its state.
fn writer_for(format: Format, state: Option<Value>) -> Result<Box<dyn FormatWriter>> {
    Ok(match format {
        Format::Dense => Box::new(dense::Dense),
        Format::CompressedTensors => Box::new(compressed_tensors::Writer::restore(state)?),
        Format::Gptq => Box::new(gptq::Writer::restore(state)?),
        Format::Gguf => Box::new(gguf::Writer::restore(
            state.context("internal: a GGUF export starts with Exporter::begin_gguf")?,
        )?),
    })
}

/// The tallies every format keeps, then the format's layout of one linear.
fn write_linear<W: FormatWriter + ?Sized>(
    w: &mut W,
    out: &mut Out,
    ckpt: &Checkpoint,
    prefix: &str,
    lin: &Linear,
) -> Result<()> {
    out.sparsity.add(prefix, lin);
    out.linears.push(prefix.to_string());
    w.linear(out, ckpt, prefix, lin)
}

pub struct Exporter {
    out: Out,
    fmt: Box<dyn FormatWriter>,
    /// The further exports of a list, each writing the same layers into its own subfolder.
    also: Vec<(String, Exporter)>,
}

impl Exporter {
    /// Start writing into `dir` (an empty work folder). Writes the embedding first.
    pub fn begin(
        format: Format,
        dir: &Path,
        ckpt: &Checkpoint,
        max_shard_bytes: usize,
    ) -> Result<Self> {
        let fmt = writer_for(format, None)?;
        Self::start(fmt, dir, ckpt, max_shard_bytes)
    }

    /// Start a GGUF export into `dir` with mix `file_type` and `--tensor-type`-style overrides.
    /// Tensors are encoded as they arrive and spilled; `finish` writes `model.gguf`.
    pub fn begin_gguf(
        dir: &Path,
        ckpt: &Checkpoint,
        file_type: FileType,
        overrides: Vec<TypeOverride>,
    ) -> Result<Self> {
        let fmt = Box::new(gguf::Writer::new(ckpt, file_type, overrides)?);
        Self::start(fmt, dir, ckpt, usize::MAX)
    }

    fn start(
        mut fmt: Box<dyn FormatWriter>,
        dir: &Path,
        ckpt: &Checkpoint,
        max_shard_bytes: usize,
    ) -> Result<Self> {
        let writer = SafetensorsWriter::new(dir, max_shard_bytes);
        let mut out = Out::new(dir.to_path_buf(), writer);
        fmt.begin(&mut out, ckpt)?;
        Ok(Exporter {
            out,
            fmt,
            also: Vec::new(),
        })
    }

    /// The format this exporter writes.
    pub fn format(&self) -> Format {
        self.fmt.format()
    }

    /// Also write every layer as `other` does, into its own folder `dir/<sub>` (the further
    /// exports of a list). `other` was begun in that folder.
    pub fn with_also(mut self, sub: &str, other: Exporter) -> Self {
        self.also.push((sub.to_string(), other));
        self
    }

    /// Store sparse linears as `format` (compressed-tensors `sparse-bitmask` or dense with
    /// zeros); only compressed-tensors has a bitmask layout.
    pub fn with_sparse_format(mut self, format: SparseFormat) -> Result<Self> {
        self.fmt.set_sparse_format(format)?;
        Ok(self)
    }

    /// Write the tail (final norm, LM head), config.json with its quantization block, the
    /// tokenizer and side files. Returns the names of the files written and the spill files
    /// to remove once the caller has recorded the artifact as complete
    /// ([`writer::remove_spills`]).
    pub fn finish(mut self, ckpt: &Checkpoint) -> Result<(Vec<String>, Vec<PathBuf>)> {
        let also = std::mem::take(&mut self.also);
        let (mut files, mut spills) = self.fmt.finish(&mut self.out, ckpt)?;
        for (sub, mut e) in also {
            let (f, s) = e.fmt.finish(&mut e.out, ckpt)?;
            files.extend(f.into_iter().map(|f| format!("{sub}/{f}")));
            spills.extend(s);
        }
        Ok((files, spills))
    }
}

impl LayerSink for Exporter {
    fn layer(&mut self, ckpt: &Checkpoint, layer: &LayerWeights) -> Result<()> {
        self.fmt.layer(&mut self.out, ckpt, layer)?;
        for (sub, e) in &mut self.also {
            e.fmt
                .layer(&mut e.out, ckpt, layer)
                .with_context(|| format!("export into `{sub}`"))?;
        }
        Ok(())
    }
}

pub use crate::quant::scale_dtype_for;
