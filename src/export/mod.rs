//! Writers of compressed checkpoints. An exporter only lays out bytes: it never runs an
//! algorithm. Tensors that no pass changed are copied byte for byte from the source.
//! This file holds the exporter and its driving loop (begin, each layer, raw copies).

mod finish;
mod gguf_export;
mod linear;
mod state;
pub mod writer;

use crate::engine::LayerSink;
use crate::model::layer::LayerWeights;
use crate::model::Checkpoint;
use crate::quant::QuantArgs;
use crate::safetensors_file::from_f32;
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use writer::SafetensorsWriter;

use crate::formats::gguf::{self, FileType, TypeOverride};

pub use crate::formats::compressed_tensors::SparseFormat;
pub use crate::formats::{Format, Order};
pub use linear::quantized_bytes;
pub use state::{ExporterState, GgufState, SparsityTally};

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
    inputs: Vec<Option<crate::quant::QuantArgs>>,
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
            inputs: Vec::new(),
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
        gguf::check_mixture(&ckpt.config)?;
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
            inputs: Vec::new(),
            gguf: Some((
                GgufState {
                    file_type,
                    overrides,
                    entries: Vec::new(),
                    pending: Default::default(),
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

    /// Also write every layer as `other` does, into its own folder `dir/<sub>` (the further
    /// exports of a list). `other` was begun in that folder.
    pub fn with_also(mut self, sub: &str, other: Exporter) -> Self {
        self.also.push((sub.to_string(), other));
        self
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
            return self.gguf_layer_done(layer.index);
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
