//! The pipeline YAML (schema v1). Unknown keys are rejected; errors name the file and point
//! to the line. Relative paths resolve against the current directory.
//!
//! ```yaml
//! model: ../shared/models/ref-llama-9m
//! output: out/ref-llama-9m-w4a16
//! device: cpu                 # cpu | cuda:N | auto
//! calibration: {path: ../shared/data/calib/c4_calib.jsonl, field: text, samples: 128, seq_len: 512, seed: 0}
//! passes:
//!   - gptq: {bits: 4, group_size: 128}
//! export: {format: compressed-tensors}   # or a list: the first at `output`, the others in
//!                                       # subfolders (`dir`, default from the format)
//! eval: {datasets: [../shared/data/eval/wikitext2/wiki.test.raw], seq_len: 512}
//! ```

use crate::export::Format;
use crate::passes::PassSpec;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub model: PathBuf,
    pub output: PathBuf,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// Each entry is a one-key map: `- gptq: {bits: 4}`.
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    pub passes: Vec<PassSpec>,
    /// One export, or a list of them written from the same run (see [`Exports`]).
    #[serde(default)]
    pub export: Exports,
    #[serde(default)]
    pub eval: Option<EvalSpec>,
}

fn default_device() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub path: PathBuf,
    #[serde(default = "default_field")]
    pub field: String,
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_seq")]
    pub seq_len: usize,
    #[serde(default)]
    pub seed: u64,
    /// Windows per forward batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// `random` (default): `samples` random windows of `seq_len` tokens of the whole text (the
    /// GPTQ reference). `documents`: the first `samples` records (JSONL lines, or blank-line
    /// separated paragraphs of a text file), each tokenized on its own with BOS and truncated
    /// to `seq_len` (llm-compressor's default preprocessing).
    #[serde(default)]
    pub sampling: Sampling,
    /// What to do when a sample's activations overflow to NaN/Inf inside the model: `error`
    /// (default) stops the run naming layer, input and window; `drop_sample` leaves those
    /// windows out from that layer on and records a warning in the report.
    #[serde(default)]
    pub on_nonfinite: crate::engine::NonFinitePolicy,
    /// Mixture-of-experts checkpoints: which tokens each expert's statistics see. `routed`
    /// (default): the tokens the router sends it, what it computes in use. `all`: every
    /// calibration token through every expert (llm-compressor's `moe_calibrate_all_experts`);
    /// the layer's output still follows the router either way.
    #[serde(default)]
    pub experts: crate::config::ExpertCalibration,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    #[default]
    Random,
    Documents,
}

fn default_field() -> String {
    "text".into()
}
fn default_samples() -> usize {
    128
}
fn default_seq() -> usize {
    512
}
fn default_batch() -> usize {
    8
}

/// What a run writes: one export (`export: {format: …}`) or several from the same calibration
/// and passes (`export: [{format: compressed-tensors}, {format: gguf, gguf_type: q4_k_m}]`).
/// The first is written at `output`, as a single export is; each other one in its own
/// subfolder `output/<dir>` (`dir` defaults to the format's name, `gguf-<type>` for GGUF), and
/// each is read back and evaluated on its own.
#[derive(Debug, Clone)]
pub struct Exports(Vec<Export>);

impl Default for Exports {
    fn default() -> Self {
        Exports(vec![Export::default()])
    }
}

impl Exports {
    /// The export written at `output`.
    pub fn primary(&self) -> &Export {
        &self.0[0]
    }

    /// The exports written in subfolders, with their folder names.
    pub fn also(&self) -> impl Iterator<Item = (String, &Export)> {
        self.0[1..].iter().map(|e| (e.dir_name(), e))
    }

    pub fn all(&self) -> &[Export] {
        &self.0
    }

    /// The GGUF exports (a `gptq_ggml` pass sweeps onto their mix).
    pub fn gguf(&self) -> impl Iterator<Item = &Export> {
        self.0.iter().filter(|e| e.format == Format::Gguf)
    }
}

impl Serialize for Exports {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match &self.0[..] {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Exports {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, SeqAccess, Visitor};
        // a map or a sequence of maps, read in place so that an error inside one keeps the
        // parser's position (line and column)
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = Exports;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an export ({format: …}) or a list of them")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<Exports, A::Error> {
                Export::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|e| Exports(vec![e]))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Exports, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = seq.next_element::<Export>()? {
                    v.push(e);
                }
                if v.is_empty() {
                    return Err(A::Error::custom(
                        "`export: []` writes nothing: give at least one export",
                    ));
                }
                Ok(Exports(v))
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Export {
    #[serde(default)]
    pub format: Format,
    /// In a list of exports, the subfolder of `output` this one is written to (default: the
    /// format's name, `gguf-<type>` for GGUF). The first export is written at `output` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Largest safetensors shard in bytes (default 4 GiB).
    #[serde(default)]
    pub max_shard_bytes: Option<usize>,
    /// `format: gguf`: llama.cpp's mix (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_s, q4_k_m, q5_k_s,
    /// q5_k_m, q6_k, f16, bf16, f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf_type: Option<crate::formats::gguf::FileType>,
    /// `format: gguf`: per-tensor types as llama-quantize's `--tensor-type`: the first
    /// `{pattern, type}` whose regex matches the GGUF tensor name wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tensor_types: Vec<crate::formats::gguf::TypeOverride>,
    /// `format: compressed-tensors`: how sparse (masked, unquantized) linears are stored:
    /// `dense` (exact zeros; default, loads everywhere) or `bitmask` (compressed-tensors
    /// `sparse-bitmask`: non-zeros + one bit per weight).
    #[serde(default, skip_serializing_if = "is_dense")]
    pub sparse_format: crate::formats::compressed_tensors::SparseFormat,
}

impl Export {
    /// The subfolder this export is written to when it is not the first of a list.
    pub fn dir_name(&self) -> String {
        match (&self.dir, self.format, self.gguf_type) {
            (Some(d), _, _) => d.clone(),
            (None, Format::Gguf, Some(t)) => format!("gguf-{}", t.name()),
            (None, f, _) => f.name().to_string(),
        }
    }

    fn validate(&self, f: &str, at: &str) -> Result<()> {
        if self.sparse_format != crate::formats::compressed_tensors::SparseFormat::Dense
            && self.format != Format::CompressedTensors
        {
            bail!("{f}: field `{at}.sparse_format: bitmask` is a compressed-tensors layout (`format: compressed-tensors`); the {} format stores sparse weights dense", self.format.name());
        }
        match (self.format, &self.gguf_type) {
            (Format::Gguf, None) => {
                bail!("{f}: field `{at}.gguf_type` is required with `format: gguf` (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, f16, bf16, f32)")
            }
            (Format::Gguf, Some(_)) => {
                crate::formats::gguf::Overrides::new(&self.tensor_types)
                    .with_context(|| format!("{f}: field `{at}.tensor_types`"))?;
            }
            (_, Some(_)) => bail!("{f}: field `{at}.gguf_type` needs `format: gguf`"),
            (_, None) if !self.tensor_types.is_empty() => {
                bail!("{f}: field `{at}.tensor_types` needs `format: gguf`")
            }
            _ => {}
        }
        Ok(())
    }
}

fn is_dense(f: &crate::formats::compressed_tensors::SparseFormat) -> bool {
    *f == crate::formats::compressed_tensors::SparseFormat::Dense
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    #[serde(default)]
    pub datasets: Vec<PathBuf>,
    #[serde(default = "default_seq")]
    pub seq_len: usize,
    /// Also evaluate the input model, for the before/after table (default true).
    #[serde(default = "default_true")]
    pub baseline: bool,
    /// Windows per forward batch.
    #[serde(default = "default_eval_batch")]
    pub batch: usize,
    /// Zero-shot tasks (lm-evaluation-harness scoring): piqa, arc_easy, arc_challenge,
    /// hellaswag, boolq, lambada.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Folder holding the task data (layout of ../shared/data/eval/tasks).
    #[serde(default = "default_tasks_dir")]
    pub tasks_dir: PathBuf,
    /// Score only the first N items of each task.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Eval cache folder for the input model's scores (default `$XDG_CACHE_HOME/compress/eval`
    /// or `~/.cache/compress/eval`; `--cache DIR` overrides, `--no-cache` turns it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// What evaluation computes in: `f32` (default) or `bf16` (linears with bf16 weights and
    /// inputs, f32 accumulation: the AVX512-BF16 kernel where the CPU has it).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: crate::model::Precision,
}

fn is_f32(p: &crate::model::Precision) -> bool {
    *p == crate::model::Precision::F32
}

fn default_tasks_dir() -> PathBuf {
    PathBuf::from("../shared/data/eval/tasks")
}

fn default_true() -> bool {
    true
}
fn default_eval_batch() -> usize {
    4
}

/// Where the work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if crate::backend::cuda_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        s if s.starts_with("cuda") => {
            let n = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .with_context(|| format!("`device: {s}`: expected cuda:N"))?,
                None if s == "cuda" => 0,
                None => bail!("`device: {s}`: expected cpu, cuda:N or auto"),
            };
            Ok(Device::Cuda(n))
        }
        _ => bail!("`device: {s}`: expected cpu, cuda:N or auto"),
    }
}

impl Pipeline {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read pipeline {}", path.display()))?;
        Self::from_str(&text, path)
    }

    pub fn from_str(text: &str, path: &Path) -> Result<Self> {
        let mut p: Pipeline =
            serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // a pass may target what an export writes (gptq_ggml: the GGUF export's mix)
        let gguf: Vec<crate::passes::gptq_ggml::GgufExport> = p
            .export
            .gguf()
            .map(|e| (e.gguf_type, e.tensor_types.clone()))
            .collect();
        for (i, pass) in p.passes.iter_mut().enumerate() {
            let name = pass.name();
            pass.bind_gguf_exports(&gguf)
                .with_context(|| format!("{}: passes[{i}] ({name})", path.display()))?;
        }
        p.validate(path)?;
        Ok(p)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let f = path.display();
        parse_device(&self.device).with_context(|| format!("{f}: field `device`"))?;
        if let Some(c) = &self.calibration {
            if c.samples == 0 {
                bail!("{f}: field `calibration.samples` must be at least 1");
            }
            if c.seq_len < 2 {
                bail!("{f}: field `calibration.seq_len` must be at least 2");
            }
            if c.batch == 0 {
                bail!("{f}: field `calibration.batch` must be at least 1");
            }
        }
        if let Some(e) = &self.eval {
            if e.seq_len < 2 {
                bail!("{f}: field `eval.seq_len` must be at least 2");
            }
            if e.batch == 0 {
                bail!("{f}: field `eval.batch` must be at least 1");
            }
            for t in &e.tasks {
                crate::eval::tasks::Task::from_name(t)
                    .with_context(|| format!("{f}: field `eval.tasks`"))?;
            }
        }
        for (i, p) in self.passes.iter().enumerate() {
            p.validate()
                .with_context(|| format!("{f}: passes[{i}] ({})", p.name()))?;
        }
        crate::passes::check_sequence(&self.passes).with_context(|| f.to_string())?;
        if self.export.gguf().next().is_none()
            && self
                .passes
                .iter()
                .any(|p| matches!(p, crate::passes::PassSpec::Imatrix(_)))
        {
            bail!("{f}: the `imatrix` pass only informs a GGUF export's rounding: use `export: {{format: gguf}}`");
        }
        // float grids are stored by compressed-tensors (or dequantized); GPTQ v1 and GGUF
        // hold integer codes
        let float = self.passes.iter().find_map(|p| {
            let a = match p {
                crate::passes::PassSpec::Rtn(r) => r.scheme.args().ok(),
                crate::passes::PassSpec::Gptq(g) => g.scheme().args().ok(),
                _ => None,
            }?;
            a.float.is_some().then_some(a)
        });
        if let Some(a) = float {
            for e in self.export.all() {
                if matches!(e.format, Format::Gptq | Format::Gguf) {
                    bail!(
                        "{f}: field `export.format`: {} stores integer grids; the float ({}) weights of this pipeline export to compressed-tensors (or dense)",
                        e.format.name(),
                        a.float.map_or("", |x| x.name()),
                    );
                }
            }
        }
        let many = self.export.all().len() > 1;
        for (i, e) in self.export.all().iter().enumerate() {
            let at = if many {
                format!("export[{i}]")
            } else {
                "export".to_string()
            };
            e.validate(&f.to_string(), &at)?;
        }
        if self.export.primary().dir.is_some() {
            bail!("{f}: field `export.dir`: the first export is written at `output` itself; `dir` names the subfolder of each further export in a list");
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, (d, _)) in self.export.also().enumerate() {
            let ok = !d.is_empty()
                && d != "."
                && d != ".."
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                bail!("{f}: field `export[{}].dir`: `{d}` is not a plain folder name (letters, digits, `-`, `_`, `.`)", i + 1);
            }
            if d == crate::formats::peft::DIR {
                bail!("{f}: field `export[{}].dir`: `{d}` is where a compensation adapter is written; choose another name", i + 1);
            }
            if !seen.insert(d.clone()) {
                bail!("{f}: field `export[{}].dir`: two exports would write to `{d}`; give one a `dir`", i + 1);
            }
        }
        if !self.passes.is_empty()
            && self.calibration.is_none()
            && self.passes.iter().any(|p| p.needs_calibration())
        {
            bail!("{f}: the passes need calibration data: add a `calibration:` block");
        }
        Ok(())
    }
}
