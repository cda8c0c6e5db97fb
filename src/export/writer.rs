//! A streaming safetensors writer: tensors are appended to a spill file as they arrive, so
//! memory stays O(one tensor); at `finish` each shard gets its header and is written out.
//! One shard → `model.safetensors`; several → `model-0000i-of-0000N.safetensors` plus
//! `model.safetensors.index.json`, as transformers and vLLM expect.

use crate::model::DType;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// What a restarted run needs to continue writing: every shard's entries and byte count.
#[derive(Clone, Serialize, Deserialize)]
pub struct WriterState {
    shards: Vec<Shard>,
}
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

impl WriterState {
    /// Each spill file and the bytes it must hold.
    pub fn spill_files(&self) -> Vec<(PathBuf, usize)> {
        self.shards
            .iter()
            .map(|s| (s.spill.clone(), s.bytes))
            .collect()
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    len: usize,
}

#[derive(Clone, Serialize, Deserialize)]
struct Shard {
    spill: PathBuf,
    entries: Vec<Entry>,
    bytes: usize,
}

pub struct SafetensorsWriter {
    dir: PathBuf,
    max_shard_bytes: usize,
    shards: Vec<Shard>,
    out: Option<BufWriter<File>>,
    names: std::collections::HashSet<String>,
    /// File name stem: `model` writes model.safetensors (or model-0000i-of-0000n.safetensors).
    stem: String,
}

impl SafetensorsWriter {
    pub fn new(dir: &Path, max_shard_bytes: usize) -> Self {
        SafetensorsWriter {
            dir: dir.to_path_buf(),
            max_shard_bytes: max_shard_bytes.max(1),
            shards: Vec::new(),
            out: None,
            names: Default::default(),
            stem: "model".into(),
        }
    }

    /// The largest shard this writer writes, in bytes.
    pub fn max_shard_bytes(&self) -> usize {
        self.max_shard_bytes
    }

    /// Name the files `<stem>.safetensors` instead of `model.safetensors`.
    pub fn with_stem(mut self, stem: &str) -> Self {
        self.stem = stem.to_string();
        self
    }

    /// Flush and sync the spill file; the returned state describes exactly the bytes on disk.
    pub fn checkpoint(&mut self) -> Result<WriterState> {
        if let (Some(w), Some(s)) = (self.out.as_mut(), self.shards.last()) {
            let ctx = || format!("cannot write {} (disk full?)", s.spill.display());
            w.flush().with_context(ctx)?;
            w.get_ref().sync_data().with_context(ctx)?;
            // the spill files' folder entries too, so a power loss cannot lose a file the
            // checkpoint names
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync {}", self.dir.display()))?;
        }
        Ok(WriterState {
            shards: self.shards.clone(),
        })
    }

    /// Continue a writer from a checkpoint: spill files are cut back to the recorded length
    /// (bytes written after the checkpoint are discarded) and the last one reopened.
    pub fn resume(dir: &Path, max_shard_bytes: usize, state: WriterState) -> Result<Self> {
        let mut w = SafetensorsWriter::new(dir, max_shard_bytes);
        for s in &state.shards {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&s.spill)
                .with_context(|| format!("resume: cannot open {}", s.spill.display()))?;
            let len = f.metadata()?.len();
            if len < s.bytes as u64 {
                bail!(
                    "resume: {} holds {len} bytes, the checkpoint recorded {}",
                    s.spill.display(),
                    s.bytes
                );
            }
            f.set_len(s.bytes as u64)?;
            for e in &s.entries {
                w.names.insert(e.name.clone());
            }
        }
        if let Some(last) = state.shards.last() {
            let f = std::fs::OpenOptions::new().append(true).open(&last.spill)?;
            w.out = Some(BufWriter::with_capacity(1 << 20, f));
        }
        w.shards = state.shards;
        Ok(w)
    }

    pub fn add(&mut self, name: &str, dtype: DType, shape: &[usize], data: &[u8]) -> Result<()> {
        let want = shape.iter().product::<usize>() * dtype.size();
        if want != data.len() {
            bail!(
                "internal: tensor `{name}` {:?} {} needs {want} bytes, got {}",
                shape,
                dtype.name(),
                data.len()
            );
        }
        if !self.names.insert(name.to_string()) {
            bail!("internal: tensor `{name}` written twice");
        }
        let start_new = match self.shards.last() {
            None => true,
            Some(s) => s.bytes > 0 && s.bytes + data.len() > self.max_shard_bytes,
        };
        if start_new {
            if let (Some(mut w), Some(s)) = (self.out.take(), self.shards.last()) {
                w.flush()
                    .with_context(|| format!("cannot write {} (disk full?)", s.spill.display()))?;
            }
            let spill = self.dir.join(format!(".shard{}.spill", self.shards.len()));
            let f = File::create(&spill)
                .with_context(|| format!("cannot create {}", spill.display()))?;
            self.out = Some(BufWriter::with_capacity(1 << 20, f));
            self.shards.push(Shard {
                spill,
                entries: Vec::new(),
                bytes: 0,
            });
        }
        let shard = self.shards.last_mut().context("no shard")?;
        let out = self.out.as_mut().context("no spill file")?;
        out.write_all(data)
            .with_context(|| format!("cannot write {} (disk full?)", shard.spill.display()))?;
        shard.bytes += data.len();
        shard.entries.push(Entry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            len: data.len(),
        });
        Ok(())
    }

    /// Write the shard files (and the index when there are several). Returns the file names
    /// and the spill files they were assembled from. The spill files are left in place: the
    /// caller removes them (see [`remove_spills`]) once it has recorded that the shards are
    /// complete, so a kill at any moment leaves either the spills a resume can reassemble or a
    /// record that the shards are done.
    pub fn finish(mut self) -> Result<(Vec<String>, Vec<PathBuf>)> {
        if let (Some(mut w), Some(s)) = (self.out.take(), self.shards.last()) {
            w.flush()
                .with_context(|| format!("cannot write {} (disk full?)", s.spill.display()))?;
        }
        let n = self.shards.len();
        let mut files = Vec::new();
        let mut weight_map = Map::new();
        let mut total = 0usize;
        for (i, shard) in self.shards.iter().enumerate() {
            let fname = if n == 1 {
                format!("{}.safetensors", self.stem)
            } else {
                format!("{}-{:05}-of-{:05}.safetensors", self.stem, i + 1, n)
            };
            let mut header = Map::new();
            header.insert("__metadata__".into(), json!({"format": "pt"}));
            let mut off = 0usize;
            for e in &shard.entries {
                header.insert(
                    e.name.clone(),
                    json!({"dtype": e.dtype.name(), "shape": e.shape, "data_offsets": [off, off + e.len]}),
                );
                off += e.len;
                weight_map.insert(e.name.clone(), Value::String(fname.clone()));
            }
            total += off;
            let mut hb = serde_json::to_vec(&Value::Object(header))?;
            while hb.len() % 8 != 0 {
                hb.push(b' ');
            }
            let path = self.dir.join(&fname);
            let f =
                File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            let ctx = || format!("cannot write {} (disk full?)", path.display());
            let mut w = BufWriter::new(f);
            w.write_all(&(hb.len() as u64).to_le_bytes())
                .with_context(ctx)?;
            w.write_all(&hb).with_context(ctx)?;
            let mut f = w
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(ctx)?;
            let mut spill = File::open(&shard.spill)
                .with_context(|| format!("cannot read {}", shard.spill.display()))?;
            // File to file: the kernel copies (copy_file_range), no user-space buffer.
            let copied = std::io::copy(&mut spill, &mut f).with_context(ctx)?;
            if copied != shard.bytes as u64 {
                bail!(
                    "{}: holds {copied} bytes, {} were written to it",
                    shard.spill.display(),
                    shard.bytes
                );
            }
            f.sync_data().with_context(ctx)?;
            files.push(fname);
        }
        if n > 1 {
            let idx = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let iname = format!("{}.safetensors.index.json", self.stem);
            let p = self.dir.join(&iname);
            std::fs::write(&p, serde_json::to_vec_pretty(&idx)?)
                .with_context(|| format!("cannot write {}", p.display()))?;
            files.push(iname);
        }
        let spills = self.shards.iter().map(|s| s.spill.clone()).collect();
        Ok((files, spills))
    }
}

impl SafetensorsWriter {
    /// Flush and hand over the spill files as they are, for a container other than safetensors
    /// (GGUF): each spill file with the (name, byte length) of its tensors, in write order.
    #[allow(clippy::type_complexity)]
    pub fn finish_spills(mut self) -> Result<Vec<(PathBuf, Vec<(String, usize)>)>> {
        if let (Some(mut w), Some(s)) = (self.out.take(), self.shards.last()) {
            w.flush()
                .with_context(|| format!("cannot write {} (disk full?)", s.spill.display()))?;
        }
        Ok(self
            .shards
            .iter()
            .map(|s| {
                (
                    s.spill.clone(),
                    s.entries.iter().map(|e| (e.name.clone(), e.len)).collect(),
                )
            })
            .collect())
    }
}

/// Remove the spill files [`SafetensorsWriter::finish`] assembled the shards from.
pub fn remove_spills(spills: &[PathBuf]) -> Result<()> {
    for s in spills {
        if s.exists() {
            std::fs::remove_file(s).with_context(|| format!("cannot remove {}", s.display()))?;
        }
    }
    Ok(())
}
