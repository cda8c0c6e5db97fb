//! The GGUF container: the header and whole-file writer, and the strict memory-mapped reader
//! (magic, version, KV pairs, tensor infos, the aligned data section) checked against the length.

use super::value::{
    write_str, Value, T_ARR, T_BOOL, T_F32, T_F64, T_I16, T_I32, T_I64, T_I8, T_STR, T_U16, T_U32,
    T_U64, T_U8,
};
use super::{ALIGNMENT, MAGIC, VERSION};
use crate::quant::ggml::GgmlType;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (input) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    pub fn nbytes(&self) -> Result<usize> {
        self.ty
            .bytes_for(self.numel())
            .with_context(|| format!("tensor `{}`", self.name))
    }
}

fn pad(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// The header (everything before the data section, padded to the alignment) and each tensor's
/// offset inside the data section.
pub fn header(kv: &[(String, Value)], tensors: &[TensorEntry]) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut h = Vec::new();
    h.extend(MAGIC);
    h.extend(VERSION.to_le_bytes());
    h.extend((tensors.len() as u64).to_le_bytes());
    h.extend((kv.len() as u64).to_le_bytes());
    let mut seen = std::collections::HashSet::new();
    for (k, v) in kv {
        ensure!(seen.insert(k.as_str()), "internal: GGUF key `{k}` twice");
        write_str(&mut h, k);
        h.extend(v.type_id().to_le_bytes());
        v.write(&mut h);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut off = 0usize;
    for t in tensors {
        write_str(&mut h, &t.name);
        h.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            h.extend(d.to_le_bytes());
        }
        h.extend(t.ty.id().to_le_bytes());
        h.extend((off as u64).to_le_bytes());
        offsets.push(off);
        off = pad(off + t.nbytes()?);
    }
    h.resize(pad(h.len()), 0);
    Ok((h, offsets))
}

/// Write a whole GGUF file: `data(i, out)` writes tensor i's bytes (exactly `nbytes`).
pub fn write_file(
    path: &Path,
    kv: &[(String, Value)],
    tensors: &[TensorEntry],
    mut data: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<()> {
    let (h, _) = header(kv, tensors)?;
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let ctx = || format!("cannot write {} (disk full?)", path.display());
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    w.write_all(&h).with_context(ctx)?;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes()?;
        let mut counter = CountingWriter {
            inner: &mut w,
            n: 0,
        };
        data(i, &mut counter)?;
        ensure!(
            counter.n == n,
            "internal: tensor `{}` wrote {} bytes, {n} expected",
            t.name,
            counter.n
        );
        w.write_all(&vec![0u8; pad(n) - n]).with_context(ctx)?;
    }
    let f = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(ctx)?;
    f.sync_data().with_context(ctx)?;
    Ok(())
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    n: usize,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A parsed GGUF file (memory-mapped).
pub struct GgufFile {
    pub path: std::path::PathBuf,
    pub version: u32,
    pub kv: BTreeMap<String, Value>,
    /// In file order, with their absolute byte ranges.
    pub tensors: Vec<(TensorEntry, std::ops::Range<usize>)>,
    mmap: memmap2::Mmap,
}

/// Refuse absurd counts and lengths before allocating for them.
const MAX_ITEMS: u64 = 1 << 24;

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            bail!(
                "{}: truncated GGUF header while reading {what} at byte {}",
                self.file.display(),
                self.pos
            );
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        ensure!(
            n <= self.b.len() as u64,
            "{}: {what}: string length {n} exceeds the file",
            self.file.display()
        );
        let s = self.take(n as usize, what)?;
        String::from_utf8(s.to_vec())
            .with_context(|| format!("{}: {what} is not UTF-8", self.file.display()))
    }
    fn value(&mut self, t: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match t {
            T_U8 => Value::U8(self.take(1, what)?[0]),
            T_I8 => Value::I8(self.take(1, what)?[0] as i8),
            T_U16 => {
                let s = self.take(2, what)?;
                Value::U16(u16::from_le_bytes([s[0], s[1]]))
            }
            T_I16 => {
                let s = self.take(2, what)?;
                Value::I16(i16::from_le_bytes([s[0], s[1]]))
            }
            T_U32 => Value::U32(self.u32(what)?),
            T_I32 => Value::I32(self.u32(what)? as i32),
            T_F32 => Value::F32(f32::from_bits(self.u32(what)?)),
            T_BOOL => {
                let b = self.take(1, what)?[0];
                ensure!(b <= 1, "{}: {what}: boolean byte {b}", self.file.display());
                Value::Bool(b == 1)
            }
            T_STR => Value::Str(self.string(what)?),
            T_ARR => {
                ensure!(
                    depth == 0,
                    "{}: {what}: nested arrays are not supported",
                    self.file.display()
                );
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                ensure!(
                    n <= MAX_ITEMS,
                    "{}: {what}: array of {n} elements",
                    self.file.display()
                );
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, what, depth + 1)?);
                }
                Value::Array(et, v)
            }
            T_U64 => Value::U64(self.u64(what)?),
            T_I64 => Value::I64(self.u64(what)? as i64),
            T_F64 => Value::F64(f64::from_bits(self.u64(what)?)),
            _ => bail!(
                "{}: {what}: unknown GGUF value type {t}",
                self.file.display()
            ),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping of a file we only read; see SafetensorsFile::open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (version, kv, tensors) = parse(&mmap, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            kv,
            tensors,
            mmap,
        })
    }

    pub fn bytes(&self, r: &std::ops::Range<usize>) -> &[u8] {
        &self.mmap[r.clone()]
    }

    pub fn tensor(&self, name: &str) -> Option<&(TensorEntry, std::ops::Range<usize>)> {
        self.tensors.iter().find(|(t, _)| t.name == name)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.kv.get(key).and_then(Value::as_u64).with_context(|| {
            format!(
                "{}: metadata `{key}` missing or not an integer",
                self.path.display()
            )
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.kv.get(key).and_then(Value::as_f64).with_context(|| {
            format!(
                "{}: metadata `{key}` missing or not a number",
                self.path.display()
            )
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.kv.get(key).and_then(Value::as_str).with_context(|| {
            format!(
                "{}: metadata `{key}` missing or not a string",
                self.path.display()
            )
        })
    }

    /// Tensor `name` decoded to f32 (ggml element order: `dims[0]` contiguous).
    pub fn f32(&self, name: &str) -> Result<(TensorEntry, Vec<f32>)> {
        let (t, r) = self
            .tensor(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.path.display()))?;
        let v = crate::quant::ggml::dequantize(t.ty, self.bytes(r), t.numel())
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{name}` decodes to a non-finite value at flat index {i}",
                self.path.display()
            );
        }
        Ok((t.clone(), v))
    }
}

/// Parse and validate a GGUF file's header against its length. Pure function.
#[allow(clippy::type_complexity)]
pub fn parse(
    b: &[u8],
    file: &Path,
) -> Result<(
    u32,
    BTreeMap<String, Value>,
    Vec<(TensorEntry, std::ops::Range<usize>)>,
)> {
    let f = file.display();
    let mut c = Cursor { b, pos: 0, file };
    let magic = c.take(4, "magic")?;
    ensure!(magic == MAGIC, "{f}: not a GGUF file (magic {magic:?})");
    let version = c.u32("version")?;
    ensure!(
        version == 2 || version == 3,
        "{f}: GGUF version {version} is not supported (2 and 3 are)"
    );
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    ensure!(
        n_tensors <= MAX_ITEMS && n_kv <= MAX_ITEMS,
        "{f}: {n_tensors} tensors and {n_kv} metadata entries: not a plausible GGUF header"
    );
    let mut kv = BTreeMap::new();
    for i in 0..n_kv {
        let k = c.string(&format!("metadata key #{i}"))?;
        let t = c.u32(&format!("type of `{k}`"))?;
        let v = c.value(t, &format!("metadata `{k}`"), 0)?;
        ensure!(
            kv.insert(k.clone(), v).is_none(),
            "{f}: metadata key `{k}` appears twice"
        );
    }
    let align = match kv.get("general.alignment") {
        None => ALIGNMENT,
        Some(v) => {
            let a = v
                .as_u64()
                .with_context(|| format!("{f}: `general.alignment` is not an integer"))?;
            ensure!(
                a > 0 && a.is_power_of_two() && a <= 1 << 20,
                "{f}: `general.alignment` {a} is not a power of two"
            );
            a as usize
        }
    };
    let mut infos = Vec::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor #{i} name"))?;
        let nd = c.u32(&format!("tensor `{name}` n_dims"))?;
        ensure!(
            (1..=4).contains(&nd),
            "{f}: tensor `{name}` has {nd} dimensions"
        );
        let mut dims = Vec::new();
        for _ in 0..nd {
            let d = c.u64(&format!("tensor `{name}` dims"))?;
            ensure!(
                d > 0 && d <= 1 << 40,
                "{f}: tensor `{name}` has dimension {d}"
            );
            dims.push(d);
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .filter(|n| *n <= 1 << 40)
            .with_context(|| format!("{f}: tensor `{name}` is implausibly large"))?;
        let tid = c.u32(&format!("tensor `{name}` type"))?;
        let ty = GgmlType::from_id(tid)
            .with_context(|| format!("{f}: tensor `{name}` has ggml type {tid}, which this reader does not decode (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_K, q5_K, q6_K)"))?;
        let off = c.u64(&format!("tensor `{name}` offset"))?;
        ensure!(
            off % align as u64 == 0,
            "{f}: tensor `{name}` offset {off} is not aligned to {align}"
        );
        let e = TensorEntry { name, dims, ty };
        let nbytes = ty
            .bytes_for(numel as usize)
            .with_context(|| format!("{f}: tensor `{}`", e.name))?;
        infos.push((e, off, nbytes));
    }
    let data_start = c.pos.div_ceil(align) * align;
    let mut tensors = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (e, off, n) in infos {
        ensure!(
            names.insert(e.name.clone()),
            "{f}: tensor `{}` appears twice",
            e.name
        );
        let start = data_start
            .checked_add(off as usize)
            .with_context(|| format!("{f}: tensor `{}` offset overflows", e.name))?;
        let end = start + n;
        ensure!(
            end <= b.len(),
            "{f}: tensor `{}` ({} bytes at {start}) runs past the end of the file ({} bytes)",
            e.name,
            n,
            b.len()
        );
        tensors.push((e, start..end));
    }
    let mut ranges: Vec<&std::ops::Range<usize>> = tensors.iter().map(|(_, r)| r).collect();
    ranges.sort_by_key(|r| r.start);
    for w in ranges.windows(2) {
        ensure!(
            w[1].start >= w[0].end,
            "{f}: tensors overlap in the data section"
        );
    }
    Ok((version, kv, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_the_parser() {
        let kv = vec![
            (
                "general.architecture".to_string(),
                Value::Str("llama".into()),
            ),
            ("x.n".to_string(), Value::U32(7)),
            (
                "x.toks".to_string(),
                Value::strings(vec!["a".into(), "bc".into()]),
            ),
        ];
        let tensors = vec![
            TensorEntry {
                name: "a".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
            TensorEntry {
                name: "b".into(),
                dims: vec![3],
                ty: GgmlType::F32,
            },
        ];
        let (mut bytes, offs) = header(&kv, &tensors).unwrap();
        assert_eq!(bytes.len() % ALIGNMENT, 0);
        assert_eq!(offs, vec![0, 96]); // 68 bytes of Q8_0 padded to 96
        bytes.resize(bytes.len() + 96 + 12, 0);
        let (v, kvp, ts) = parse(&bytes, Path::new("t.gguf")).unwrap();
        assert_eq!(v, 3);
        assert_eq!(kvp["x.n"], Value::U32(7));
        assert_eq!(ts.len(), 2);
        assert_eq!(ts[1].1.len(), 12);
        // a truncated file is refused with the tensor named
        let e = parse(&bytes[..bytes.len() - 1], Path::new("t.gguf")).unwrap_err();
        assert!(format!("{e:#}").contains("`b`"), "{e:#}");
    }
}
