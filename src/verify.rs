//! `compress verify DIR`: is an output folder complete and intact? For batch jobs that copy
//! artifacts between machines or storage tiers before serving them.
//!
//! 1. `checksums.sha256` lists every file of the folder (none missing, none extra) and each
//!    file's SHA-256 matches;
//! 2. the checkpoint opens (config, safetensors headers, index) and every tensor the
//!    architecture needs loads — quantized linears are unpacked and dequantized, every value
//!    must be finite.

use crate::model::layer::LayerWeights;
use crate::model::llama::Outer;
use crate::model::Checkpoint;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Verified {
    pub files: usize,
    pub bytes: u64,
    pub layers: usize,
    pub architecture: String,
    /// `quantization_config.format` when quantized.
    pub format: Option<String>,
}

/// Open the checkpoint in `dir` and load every tensor the architecture needs.
fn load_all(dir: &Path) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(dir)?;
    drop(Outer::load(&ckpt, false)?);
    for l in 0..ckpt.config.num_layers {
        drop(
            LayerWeights::load(&ckpt, l)
                .with_context(|| format!("{}: layer {l}", dir.display()))?,
        );
        ckpt.release_prefix(&LayerWeights::prefix(l));
    }
    Ok(ckpt)
}

pub fn verify(dir: &Path) -> Result<Verified> {
    let list = dir.join("checksums.sha256");
    let text = std::fs::read_to_string(&list).with_context(|| {
        format!(
            "{}: cannot read it (not a compress output, or an incomplete one)",
            list.display()
        )
    })?;
    let mut listed = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let (hash, name) = line
            .split_once("  ")
            .with_context(|| format!("{}:{}: expected `SHA256  NAME`", list.display(), i + 1))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{}:{}: `{hash}` is not a SHA-256", list.display(), i + 1);
        }
        // a relative path inside the folder: no empty, `.` or `..` component
        if name.is_empty()
            || name.starts_with('/')
            || name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!(
                "{}:{}: `{name}` is not a file inside the folder",
                list.display(),
                i + 1
            );
        }
        listed.insert(name.to_string(), hash.to_ascii_lowercase());
    }
    let present = crate::util::files_under(dir, &[])?;
    for n in &present {
        if !listed.contains_key(n) {
            bail!(
                "{}: `{n}` is not listed in checksums.sha256 (a leftover or a foreign file)",
                dir.display()
            );
        }
    }
    let mut bytes = 0;
    for (name, want) in &listed {
        let p = dir.join(name);
        if !p.is_file() {
            bail!("{}: listed in checksums.sha256 but missing", p.display());
        }
        let got = crate::util::sha256_file(&p)?;
        if &got != want {
            bail!(
                "{}: checksum mismatch (listed {want}, file has {got}): corrupt or changed",
                p.display()
            );
        }
        bytes += std::fs::metadata(&p)?.len();
    }
    let ckpt = load_all(dir)?;
    // the further exports of a list (`export: [...]`), each in its own subfolder with its
    // own config.json
    let mut subs: Vec<&str> = listed
        .keys()
        .filter_map(|n| n.strip_suffix("/config.json"))
        .filter(|d| !d.contains('/'))
        .collect();
    subs.dedup();
    for d in subs {
        load_all(&dir.join(d))?;
    }
    Ok(Verified {
        files: listed.len(),
        bytes,
        layers: ckpt.config.num_layers,
        architecture: ckpt.config.arch.name().to_string(),
        format: ckpt
            .config
            .raw
            .pointer("/quantization_config/format")
            .and_then(|v| v.as_str())
            .map(String::from),
    })
}
