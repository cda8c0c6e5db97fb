//! Resuming an interrupted run. After every decoder layer the run's work folder gets
//! `.resume/hidden-L.bin` (the next layer's calibration inputs, f32), `.resume/teacher-L.bin`
//! (the dense model's, when a pass reads the teacher stream) and `.resume/state.json` (what the
//! exporter has written, the engine's report so far, each pass's state kept across layers, and
//! fingerprints of the pipeline, the model and the calibration data), each written to a temp
//! file and renamed, the state last. `compress PIPELINE --resume` continues from the last complete layer and refuses
//! if any fingerprint changed.

use crate::engine::{Carry, EngineReport, LayerSink, PassState, ResumePoint};
use crate::export::{Exporter, ExporterState};
use crate::model::layer::LayerWeights;
use crate::model::llama::Act;
use crate::model::Checkpoint;
use crate::pipeline::Pipeline;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Hashes of what determines a run's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The pipeline as run (after --model / --output overrides).
    pub pipeline: String,
    /// config.json, tokenizer.json, and every safetensors file's header and length.
    pub model: String,
    /// The calibration file's bytes (empty when there is none).
    pub calibration: String,
    /// The running `compress` executable's bytes: another build may compute other bits, so
    /// a resumed run must be finished by the binary that started it.
    #[serde(default)]
    pub tool: String,
}

impl Fingerprint {
    pub fn of(p: &Pipeline, ckpt: &Checkpoint) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(p)?);
        let pipeline = format!("{:x}", h.finalize());
        let mut h = Sha256::new();
        for f in ["config.json", "tokenizer.json"] {
            if let Ok(b) = std::fs::read(ckpt.dir.join(f)) {
                h.update(f.as_bytes());
                h.update(&b);
            }
        }
        for f in &ckpt.files {
            let meta = std::fs::metadata(&f.path)?;
            h.update(
                f.path
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
            );
            h.update(meta.len().to_le_bytes());
            for (name, t) in &f.tensors {
                h.update(name.as_bytes());
                h.update(t.dtype.name().as_bytes());
                h.update(format!("{:?}{}{}", t.shape, t.start, t.end).as_bytes());
            }
        }
        let model = format!("{:x}", h.finalize());
        let calibration = match &p.calibration {
            Some(c) if c.path.exists() => crate::util::sha256_file(&c.path)?,
            _ => String::new(),
        };
        let tool = std::env::current_exe()
            .ok()
            .and_then(|p| crate::util::sha256_file(&p).ok())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
        Ok(Fingerprint {
            pipeline,
            model,
            calibration,
            tool,
        })
    }

    /// Which parts differ, for the refusal message.
    pub fn diff(&self, o: &Fingerprint) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.pipeline != o.pipeline {
            v.push("the pipeline");
        }
        if self.model != o.model {
            v.push("the model");
        }
        if self.calibration != o.calibration {
            v.push("the calibration data");
        }
        if self.tool != o.tool {
            v.push("the compress executable");
        }
        v
    }
}

#[derive(Serialize, Deserialize)]
pub struct State {
    pub fingerprint: Fingerprint,
    pub next_layer: usize,
    pub exporter: ExporterState,
    pub engine: EngineReport,
    /// (b, t) of each hidden-state batch in hidden-L.bin.
    pub hidden_shapes: Vec<(usize, usize)>,
    /// (b, t) of each teacher-stream batch in teacher-L.bin (empty without a teacher stream).
    #[serde(default)]
    pub teacher_shapes: Vec<(usize, usize)>,
    /// Each pass's state after layer `next_layer - 1` (see `engine::PassState`).
    #[serde(default)]
    pub pass_states: Vec<PassState>,
    /// SHA-256 of each finished layer's input tensors (names, dtypes, shapes, bytes): the
    /// model fingerprint covers headers only, so a resume re-hashes the layers it will not
    /// read again and refuses if their weights changed.
    #[serde(default)]
    pub layer_digests: Vec<String>,
    /// Set once the artifact is completely written: a resumed run skips compression and
    /// continues with the first evaluation step not finished.
    #[serde(default)]
    pub exported: Option<Exported>,
    /// What each pass's whole-model phase found (its index in `passes`, and its result: OWL's
    /// (outlier ratio, sparsity) per layer, a budget's allocation), so a resumed run does not
    /// scan the dense model again.
    #[serde(default, alias = "owl")]
    pub prepared: Prepared,
}

/// Per pass with a whole-model phase: its index in `passes` and what the phase found.
pub type Prepared = Vec<(usize, serde_json::Value)>;

/// The finished artifact, as recorded when the last shard was complete.
#[derive(Clone, Serialize, Deserialize)]
pub struct Exported {
    /// Files written (weights, config, side files), in the order the exporter reported them.
    pub files: Vec<String>,
    /// SHA-256 of each file in `files`, re-checked before a resumed run uses the artifact.
    pub digests: Vec<String>,
    pub engine: EngineReport,
    pub calibration_seconds: f64,
    pub compress_seconds: f64,
}

/// Record that the artifact in `work` is complete (the state keeps its fingerprints).
pub fn mark_exported(work: &Path, exported: Exported) -> Result<()> {
    let mut state = load(work)?.with_context(|| {
        format!(
            "internal: {} has no resume state to mark as exported",
            work.display()
        )
    })?;
    state.exported = Some(exported);
    write_atomic(&dir(work).join("state.json"), &serde_json::to_vec(&state)?)?;
    // The hidden states of the last layer are of no further use.
    for h in [
        dir(work).join(hidden_file(state.next_layer)),
        dir(work).join(teacher_file(state.next_layer)),
    ] {
        if h.exists() {
            std::fs::remove_file(&h).with_context(|| format!("cannot remove {}", h.display()))?;
        }
    }
    Ok(())
}

/// SHA-256 of each of `files` in `work`.
pub fn file_digests(work: &Path, files: &[String]) -> Result<Vec<String>> {
    files
        .iter()
        .map(|f| crate::util::sha256_file(&work.join(f)))
        .collect()
}

/// Check that a work folder holds what `state` says, before anything is resumed: the finished
/// artifact's files with their recorded hashes, or the spill files and hidden states of the
/// last finished layer. The error says what is wrong and that `--resume` cannot help.
pub fn validate(work: &Path, state: &State, hidden: usize) -> Result<()> {
    let unusable = |what: String| {
        anyhow::anyhow!(
            "cannot resume {}: {what}; this work folder cannot be resumed: run without --resume to start over",
            work.display()
        )
    };
    if let Some(x) = &state.exported {
        if x.digests.len() != x.files.len() {
            return Err(unusable("the resume state is inconsistent".into()));
        }
        for (f, want) in x.files.iter().zip(&x.digests) {
            let p = work.join(f);
            if !p.is_file() {
                return Err(unusable(format!(
                    "{} of the finished artifact is missing",
                    p.display()
                )));
            }
            let got = crate::util::sha256_file(&p)
                .map_err(|e| unusable(format!("cannot read {}: {e}", p.display())))?;
            if &got != want {
                return Err(unusable(format!(
                    "{} changed after it was written (SHA-256 differs)",
                    p.display()
                )));
            }
        }
        return Ok(());
    }
    for (path, bytes) in state.exporter.spill_files() {
        let len = std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|_| unusable(format!("{} (written layers) is missing", path.display())))?;
        if len < bytes as u64 {
            return Err(unusable(format!(
                "{} holds {len} bytes, the resume state recorded {bytes}",
                path.display()
            )));
        }
    }
    for (file, shapes) in [
        (hidden_file(state.next_layer), &state.hidden_shapes),
        (teacher_file(state.next_layer), &state.teacher_shapes),
    ] {
        if shapes.is_empty() {
            continue;
        }
        let p = dir(work).join(file);
        let want: u64 = shapes
            .iter()
            .map(|(b, t)| (b * t * hidden * 4) as u64)
            .sum();
        match std::fs::metadata(&p) {
            Ok(m) if m.len() == want => {}
            Ok(m) => {
                return Err(unusable(format!(
                    "{} holds {} bytes, the resume state expects {want}",
                    p.display(),
                    m.len()
                )))
            }
            Err(_) => return Err(unusable(format!("{} is missing", p.display()))),
        }
    }
    Ok(())
}

/// Evaluation results finished so far (`.resume/eval.json`), so a resumed run re-runs only the
/// evaluation steps a kill interrupted. Keys are `STEP/LABEL/NAME` (`ppl/before/wiki.test.raw`,
/// `tasks/after/piqa`); values the step's result and its seconds.
#[derive(Default, Serialize, Deserialize)]
pub struct EvalCache {
    pub entries: std::collections::BTreeMap<String, (serde_json::Value, f64)>,
    #[serde(skip)]
    path: Option<PathBuf>,
}

impl EvalCache {
    /// The cache of `work` (empty when there is none, or when `fresh`).
    pub fn open(work: &Path, fresh: bool) -> Result<Self> {
        let path = dir(work).join("eval.json");
        let mut c = if !fresh && path.exists() {
            let b =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_slice(&b)
                .with_context(|| format!("{}: corrupt evaluation cache", path.display()))?
        } else {
            EvalCache::default()
        };
        c.path = Some(path);
        Ok(c)
    }

    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<(T, f64)> {
        let (v, s) = self.entries.get(key)?;
        Some((serde_json::from_value(v.clone()).ok()?, *s))
    }

    /// Record one finished step, durably (temp file, sync, rename).
    pub fn put<T: Serialize>(&mut self, key: &str, value: &T, seconds: f64) -> Result<()> {
        self.entries
            .insert(key.to_string(), (serde_json::to_value(value)?, seconds));
        if let Some(p) = &self.path {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
            }
            write_atomic(p, &serde_json::to_vec(&*self)?)?;
        }
        Ok(())
    }
}

/// SHA-256 of decoder layer `l`'s tensors in the checkpoint (sorted by name).
pub fn layer_digest(ckpt: &Checkpoint, l: usize) -> Result<String> {
    let prefix = LayerWeights::prefix(l);
    let mut h = Sha256::new();
    for name in ckpt.names().filter(|n| n.starts_with(&prefix)) {
        let (info, bytes) = ckpt.raw(name)?;
        h.update(name.as_bytes());
        h.update(info.dtype.name().as_bytes());
        h.update(format!("{:?}", info.shape).as_bytes());
        h.update(bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Refuse to resume when the weights of a finished layer changed since the interrupted run.
pub fn check_layer_digests(ckpt: &Checkpoint, state: &State) -> Result<()> {
    for (l, want) in state.layer_digests.iter().enumerate() {
        let got = layer_digest(ckpt, l)?;
        ckpt.release_prefix(&LayerWeights::prefix(l));
        if &got != want {
            bail!(
                "cannot resume: the weights of layer {l} in {} changed since the interrupted run (run without --resume to start over)",
                ckpt.dir.display()
            );
        }
    }
    Ok(())
}

pub fn dir(work: &Path) -> PathBuf {
    work.join(".resume")
}

/// The saved state of an interrupted run in `work`, if any.
pub fn load(work: &Path) -> Result<Option<State>> {
    let p = dir(work).join("state.json");
    if !p.exists() {
        return Ok(None);
    }
    let b = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(Some(serde_json::from_slice(&b).with_context(|| {
        format!("{}: corrupt resume state", p.display())
    })?))
}

/// Load the hidden states recorded with `state` and build the engine's resume point.
pub fn resume_point(work: &Path, state: &State, hidden: usize) -> Result<ResumePoint> {
    let d = dir(work);
    Ok(ResumePoint {
        next_layer: state.next_layer,
        hidden: read_acts(
            &d.join(hidden_file(state.next_layer)),
            &state.hidden_shapes,
            hidden,
        )?,
        teacher: read_acts(
            &d.join(teacher_file(state.next_layer)),
            &state.teacher_shapes,
            hidden,
        )?,
        pass_states: state.pass_states.clone(),
        report: state.engine.clone(),
    })
}

/// Hidden-state batches of the given (b, t) shapes from one f32 file (none when `shapes` is
/// empty).
fn read_acts(p: &Path, shapes: &[(usize, usize)], hidden: usize) -> Result<Vec<Act>> {
    let mut acts = Vec::new();
    if shapes.is_empty() {
        return Ok(acts);
    }
    let b = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
    let want: usize = shapes.iter().map(|(b, t)| b * t * hidden * 4).sum();
    if b.len() != want {
        bail!(
            "{}: holds {} bytes, the resume state expects {want}",
            p.display(),
            b.len()
        );
    }
    let mut off = 0;
    for &(bb, t) in shapes {
        let n = bb * t * hidden;
        let data = b[off..off + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        off += 4 * n;
        acts.push(Act { data, b: bb, t });
    }
    Ok(acts)
}

fn acts_bytes(acts: &[Act]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(acts.iter().map(|a| a.data.len() * 4).sum());
    for a in acts {
        for v in &a.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {} (disk full?)", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {}", tmp.display()))?;
    sync_dir(path)
}

/// Make a rename in `path`'s folder durable (it lives in the folder's entries, which a power
/// loss can otherwise roll back).
fn sync_dir(path: &Path) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {}", d.display()))?;
    }
    Ok(())
}

/// The exporter, checkpointed after every layer.
pub struct ResumableSink<'a> {
    pub exporter: &'a mut Exporter,
    pub work: PathBuf,
    pub fingerprint: Fingerprint,
    /// Digests of the layers finished so far (see `State::layer_digests`).
    pub layer_digests: Vec<String>,
    /// See `State::prepared`.
    pub prepared: Prepared,
}

impl LayerSink for ResumableSink<'_> {
    fn layer(&mut self, ckpt: &Checkpoint, layer: &LayerWeights) -> Result<()> {
        self.layer_digests.truncate(layer.index);
        self.layer_digests.push(layer_digest(ckpt, layer.index)?);
        self.exporter.layer(ckpt, layer)
    }

    fn layer_done(&mut self, l: usize, carry: &Carry, report: &EngineReport) -> Result<()> {
        let (hidden, teacher) = (carry.hidden, carry.teacher);
        let d = dir(&self.work);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        let exporter = self.exporter.checkpoint()?;
        // Hidden states (and the teacher stream) go to files of their own per layer, and the
        // state that names them is written last: a crash (or a full disk) between the two
        // leaves the previous state and its own files intact.
        write_atomic(&d.join(hidden_file(l + 1)), &acts_bytes(hidden))?;
        if !teacher.is_empty() {
            write_atomic(&d.join(teacher_file(l + 1)), &acts_bytes(teacher))?;
        }
        let state = State {
            fingerprint: self.fingerprint.clone(),
            next_layer: l + 1,
            exporter,
            engine: report.clone(),
            hidden_shapes: hidden.iter().map(|a| (a.b, a.t)).collect(),
            teacher_shapes: teacher.iter().map(|a| (a.b, a.t)).collect(),
            pass_states: carry.pass_states.to_vec(),
            layer_digests: self.layer_digests.clone(),
            exported: None,
            prepared: self.prepared.clone(),
        };
        write_atomic(&d.join("state.json"), &serde_json::to_vec(&state)?)?;
        for old in [d.join(hidden_file(l)), d.join(teacher_file(l))] {
            if old.exists() {
                std::fs::remove_file(&old)
                    .with_context(|| format!("cannot remove {}", old.display()))?;
            }
        }
        Ok(())
    }
}

/// The hidden states that are the inputs of layer `next_layer`.
fn hidden_file(next_layer: usize) -> String {
    format!("hidden-{next_layer}.bin")
}

/// The teacher stream at the input of layer `next_layer`.
fn teacher_file(next_layer: usize) -> String {
    format!("teacher-{next_layer}.bin")
}
