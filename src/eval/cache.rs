//! The baseline once: the input model's evaluation scores, kept in a cache folder under a
//! fingerprint of everything that determines them, so a sweep of recipes over one checkpoint
//! evaluates it once.
//!
//! The key of an entry is the SHA-256 of: the checkpoint's content (config.json, the tokenizer
//! files and every weight file's bytes), the evaluated data (the data file's bytes, or a task's
//! data files), the protocol (seq_len, windows per batch, task item limit and context length),
//! the precision, and the tool (its version and the running executable's bytes: another build
//! may compute other bits). One entry per data set or task, as a JSON file `KEY.json`:
//!
//! ```json
//! {"format": "compress-eval-cache/1", "key": "…", "what": {…}, "sha256": "…", "content": "…"}
//! ```
//!
//! `content` is the result as a JSON string and `sha256` its checksum. Entries are written to a
//! temporary file and renamed into place. An entry that does not parse (corrupted, truncated),
//! names another key (foreign) or whose content does not match its checksum (tampered) is never
//! trusted: a warning is logged and the scores are computed again (and the entry replaced).

use crate::model::Checkpoint;
use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const FORMAT: &str = "compress-eval-cache/1";

/// Checkpoint files besides the weights that change what evaluation computes.
const MODEL_FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The default cache folder: `$XDG_CACHE_HOME/compress/eval`, else `~/.cache/compress/eval`.
pub fn default_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("compress").join("eval"))
}

/// What a cache lookup found.
pub enum Lookup<T> {
    /// A valid entry: the result and the seconds its computation took.
    Hit(T, f64),
    /// No usable entry (absent, or rejected with a warning).
    Miss,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    format: String,
    key: String,
    /// The inputs of the key, for a person reading the folder (not trusted on lookup).
    what: serde_json::Value,
    sha256: String,
    content: String,
}

#[derive(Serialize, Deserialize)]
struct Content<T> {
    result: T,
    seconds: f64,
}

/// Evaluation cache of one checkpoint in one folder.
pub struct EvalCache {
    pub dir: PathBuf,
    model: String,
    tool: String,
    precision: String,
}

fn hex(b: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b);
    format!("{:x}", h.finalize())
}

/// SHA-256 over the checkpoint's config, tokenizer files and every weight file's bytes.
pub fn model_digest(ckpt: &Checkpoint) -> Result<String> {
    let mut h = Sha256::new();
    for f in MODEL_FILES {
        let p = ckpt.dir.join(f);
        if p.exists() {
            h.update(f.as_bytes());
            h.update(crate::util::sha256_file(&p)?.as_bytes());
        }
    }
    for f in &ckpt.files {
        let name = f
            .path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        h.update(name.as_bytes());
        h.update(crate::util::sha256_file(&f.path)?.as_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The running executable's version and bytes.
fn tool_digest() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| crate::util::sha256_file(&p).ok())
        .unwrap_or_default();
    format!("{} {exe}", env!("CARGO_PKG_VERSION"))
}

impl EvalCache {
    /// The cache of `ckpt`'s scores at `precision` in `dir` (created on the first write).
    /// Hashes every file of the checkpoint.
    pub fn open(dir: &Path, ckpt: &Checkpoint, precision: &str) -> Result<Self> {
        Ok(EvalCache {
            dir: dir.to_path_buf(),
            model: model_digest(ckpt)?,
            tool: tool_digest(),
            precision: precision.to_string(),
        })
    }

    fn key_of(&self, what: &serde_json::Value) -> String {
        let v = serde_json::json!({
            "model": self.model, "tool": self.tool, "precision": self.precision, "what": what
        });
        hex(v.to_string().as_bytes())
    }

    /// What a perplexity entry depends on besides the model: the data's bytes and the protocol.
    pub fn ppl_what(data: &Path, seq_len: usize, batch: usize) -> Result<serde_json::Value> {
        Ok(serde_json::json!({
            "kind": "perplexity",
            "data": super::dataset_key(data),
            "data_sha256": crate::util::sha256_file(data)?,
            "seq_len": seq_len,
            "batch": batch,
        }))
    }

    /// What a zero-shot task entry depends on besides the model.
    pub fn task_what(
        task: crate::eval::tasks::Task,
        root: &Path,
        limit: Option<usize>,
        max_len: usize,
    ) -> Result<serde_json::Value> {
        let mut files = serde_json::Map::new();
        for f in task.data_files(root) {
            // a missing file is the task loader's error to report; it changes the key here
            let d = crate::util::sha256_file(&f).unwrap_or_default();
            files.insert(f.display().to_string(), d.into());
        }
        Ok(serde_json::json!({
            "kind": "task",
            "task": task.name(),
            "files": files,
            "limit": limit,
            "max_len": max_len,
        }))
    }

    /// The file an entry for `what` lives in.
    pub fn path(&self, what: &serde_json::Value) -> PathBuf {
        self.dir.join(format!("{}.json", self.key_of(what)))
    }

    /// The entry for `what`, if there is a valid one. A rejected entry logs a warning.
    pub fn get<T: DeserializeOwned>(&self, what: &serde_json::Value) -> Lookup<T> {
        let key = self.key_of(what);
        let path = self.path(what);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => {
                crate::info!(
                    "warning: eval cache entry {} cannot be read ({e}): computing again",
                    path.display()
                );
                return Lookup::Miss;
            }
        };
        match Self::check::<T>(&bytes, &key) {
            Ok(c) => Lookup::Hit(c.result, c.seconds),
            Err(why) => {
                crate::info!(
                    "warning: eval cache entry {} is not trusted ({why}): computing again",
                    path.display()
                );
                Lookup::Miss
            }
        }
    }

    fn check<T: DeserializeOwned>(bytes: &[u8], key: &str) -> Result<Content<T>, String> {
        let e: Entry =
            serde_json::from_slice(bytes).map_err(|e| format!("corrupted or truncated: {e}"))?;
        if e.format != FORMAT {
            return Err(format!("foreign format `{}`", e.format));
        }
        if e.key != key {
            return Err(format!("foreign: it is the entry of key {}", e.key));
        }
        if hex(e.content.as_bytes()) != e.sha256 {
            return Err("its content does not match its checksum (tampered or corrupted)".into());
        }
        serde_json::from_str(&e.content).map_err(|e| format!("corrupted content: {e}"))
    }

    /// Store `result` (computed in `seconds`) for `what`: temp file, then rename. Returns the
    /// entry's path.
    pub fn put<T: Serialize>(
        &self,
        what: &serde_json::Value,
        result: &T,
        seconds: f64,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create eval cache folder {}", self.dir.display()))?;
        let content = serde_json::to_string(&Content { result, seconds })?;
        let key = self.key_of(what);
        let e = Entry {
            format: FORMAT.into(),
            key: key.clone(),
            what: what.clone(),
            sha256: hex(content.as_bytes()),
            content,
        };
        let path = self.path(what);
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        crate::util::write_file(&tmp, &serde_json::to_vec_pretty(&e)?)?;
        std::fs::rename(&tmp, &path).with_context(|| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot rename {} to {}", tmp.display(), path.display())
        })?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path) -> EvalCache {
        EvalCache {
            dir: dir.to_path_buf(),
            model: "m".into(),
            tool: "t".into(),
            precision: "f32".into(),
        }
    }

    #[test]
    fn entries_round_trip_and_reject_tampering() {
        let d = tempfile::tempdir().unwrap();
        let c = cache(d.path());
        let what = serde_json::json!({"kind": "x", "n": 1});
        assert!(matches!(c.get::<Vec<f64>>(&what), Lookup::Miss));
        let v = vec![1.0f64 / 3.0, 2.5e-300, 7.0];
        let p = c.put(&what, &v, 1.5).unwrap();
        match c.get::<Vec<f64>>(&what) {
            Lookup::Hit(r, s) => {
                assert_eq!(r, v);
                assert_eq!(s, 1.5);
            }
            Lookup::Miss => panic!("expected a hit"),
        }
        // no temp file left behind
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        let good = std::fs::read_to_string(&p).unwrap();
        // truncated
        std::fs::write(&p, &good[..good.len() / 2]).unwrap();
        assert!(matches!(c.get::<Vec<f64>>(&what), Lookup::Miss));
        // tampered content (checksum no longer matches)
        std::fs::write(&p, good.replace("7.0", "8.0")).unwrap();
        assert!(matches!(c.get::<Vec<f64>>(&what), Lookup::Miss));
        // foreign: another key's entry copied over this one
        let other = serde_json::json!({"kind": "x", "n": 2});
        let p2 = c.put(&other, &v, 1.0).unwrap();
        std::fs::copy(&p2, &p).unwrap();
        assert!(matches!(c.get::<Vec<f64>>(&what), Lookup::Miss));
        // another precision or tool is another key
        c.put(&what, &v, 1.0).unwrap();
        let mut c2 = cache(d.path());
        c2.precision = "bf16".into();
        assert!(matches!(c2.get::<Vec<f64>>(&what), Lookup::Miss));
        assert!(matches!(c.get::<Vec<f64>>(&what), Lookup::Hit(..)));
    }
}
