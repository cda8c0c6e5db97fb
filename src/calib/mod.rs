//! Text → tokens, and calibration windows.
//!
//! Text files are read as is; `.jsonl` files contribute one field per line (default `text`),
//! joined with "\n\n". The whole text is tokenized once with the model's tokenizer.json (its
//! post-processor adds BOS as transformers would). Calibration windows are `samples` random
//! windows of `seq_len` consecutive tokens, start positions drawn from a ChaCha8 generator seeded
//! with `seed` — the GPTQ reference's protocol (random windows of the tokenized text).

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::path::Path;
use tokenizers::Tokenizer;

/// Load tokenizer.json for evaluation and calibration. A `truncation` or `padding` block saved
/// in the file (tokenizers saved after a truncating call carry one) is switched off, saying so
/// once: left on, a 71,000-token text would silently be scored as its first 512 tokens.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        bail!("{}: tokenizer.json not found", path.display());
    }
    let mut tok = Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
    let mut off = Vec::new();
    if let Some(t) = tok.get_truncation() {
        off.push(format!("truncation (max_length {})", t.max_length));
    }
    if tok.get_padding().is_some() {
        off.push("padding".to_string());
    }
    if !off.is_empty() {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            crate::info!(
                "{}: ignoring the saved {}: texts are tokenized whole",
                path.display(),
                off.join(" and ")
            )
        });
        tok.with_truncation(None).map_err(|e| {
            anyhow::anyhow!("{}: cannot switch truncation off: {e}", path.display())
        })?;
        tok.with_padding(None);
    }
    Ok(tok)
}

/// A floor on the tokens any faithful tokenization of `text` by `tok` yields: no token stands
/// for more bytes than the longest vocabulary entry takes in UTF-8 (byte-level BPE and
/// SentencePiece entries are at least as long as the bytes they stand for), halved as a margin
/// for normalizers that drop characters. A tokenizer that cuts texts (a saved `truncation`)
/// falls far below it.
pub fn min_tokens(tok: &Tokenizer, text: &str) -> usize {
    let longest = tok
        .get_vocab(true)
        .keys()
        .map(|k| k.len())
        .max()
        .unwrap_or(1)
        .max(1);
    text.len() / (2 * longest)
}

/// Read a text file, or the `field` of every line of a `.jsonl` file joined with "\n\n".
pub fn read_text(path: &Path, field: &str) -> Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (missing, or not UTF-8)", path.display()))?;
    let is_jsonl = path
        .extension()
        .map(|e| e == "jsonl" || e == "json")
        .unwrap_or(false);
    if !is_jsonl {
        return Ok(raw);
    }
    let mut parts = Vec::new();
    for (i, line) in raw.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let s = v
            .get(field)
            .and_then(|s| s.as_str())
            .with_context(|| format!("{}:{}: no string field `{field}`", path.display(), i + 1))?;
        parts.push(s.to_string());
    }
    if parts.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(parts.join("\n\n"))
}

/// Tokenize a whole text once, special tokens added by the tokenizer's post-processor.
pub fn tokenize(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// The token the tokenizer's post-processor puts before a text (BOS), if it adds one.
pub fn added_bos(tok: &Tokenizer) -> Result<Option<u32>> {
    let enc = |special| {
        tok.encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))
    };
    let (with, without) = (enc(true)?, enc(false)?);
    Ok((with.len() == without.len() + 1 && with[1..] == without[..]).then(|| with[0]))
}

/// The first `samples` non-empty records, each tokenized on its own (BOS added) and truncated
/// to `seq_len` tokens. Records: JSONL `field`s, or blank-line separated paragraphs.
pub fn document_windows(
    tok: &Tokenizer,
    path: &Path,
    field: &str,
    samples: usize,
    seq_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let text = read_text(path, field)?;
    let mut out = Vec::new();
    for rec in text.split("\n\n").filter(|r| !r.trim().is_empty()) {
        if out.len() == samples {
            break;
        }
        let mut ids = tokenize(tok, rec)?;
        ids.truncate(seq_len);
        if ids.len() >= 2 {
            out.push(ids);
        }
    }
    if out.len() < samples {
        bail!(
            "{}: only {} usable records for {samples} samples",
            path.display(),
            out.len()
        );
    }
    Ok(out)
}

/// `samples` windows of `seq_len` tokens at random start positions (seeded, reproducible).
pub fn random_windows(
    tokens: &[u32],
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if tokens.len() <= seq_len {
        bail!(
            "calibration text has {} tokens, fewer than one window of seq_len {seq_len}",
            tokens.len()
        );
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Ok((0..samples)
        .map(|_| {
            let s = rng.gen_range(0..tokens.len() - seq_len);
            tokens[s..s + seq_len].to_vec()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_reproducible_and_in_range() {
        let tokens: Vec<u32> = (0..1000).collect();
        let a = random_windows(&tokens, 16, 64, 0).unwrap();
        let b = random_windows(&tokens, 16, 64, 0).unwrap();
        let c = random_windows(&tokens, 16, 64, 1).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        for w in &a {
            assert_eq!(w.len(), 64);
            // consecutive tokens of the text
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1));
        }
        assert!(random_windows(&tokens[..10], 1, 64, 0).is_err());
    }

    #[test]
    fn jsonl_fields_are_joined_and_errors_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        assert_eq!(read_text(&p, "text").unwrap(), "a\n\nb");
        let e = read_text(&p, "body").unwrap_err().to_string();
        assert!(e.contains("c.jsonl:1") && e.contains("body"), "{e}");
        std::fs::write(&p, "{\"text\": \"a\"}\nnot json\n").unwrap();
        let e = read_text(&p, "text").unwrap_err().to_string();
        assert!(e.contains("c.jsonl:2"), "{e}");
    }
}
