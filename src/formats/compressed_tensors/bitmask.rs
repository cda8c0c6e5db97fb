//! compressed-tensors' sparse formats: `sparse-bitmask` tensors and the `sparsity_config` block.

use super::super::bits::i64s_to_bytes;
use super::super::{get_i64s, NamedTensor, TensorGetter};
use crate::safetensors_file::{from_f32, to_f32, DType};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// How sparse linears are stored (`export.sparse_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SparseFormat {
    /// The weight matrix with exact zeros (loads everywhere).
    #[default]
    Dense,
    /// compressed-tensors `sparse-bitmask`: the non-zeros and a bit per position.
    Bitmask,
}

impl SparseFormat {
    /// The `format` of the `sparsity_config` block.
    pub fn name(&self) -> &'static str {
        match self {
            SparseFormat::Dense => "dense",
            SparseFormat::Bitmask => "sparse-bitmask",
        }
    }
}

/// compressed-tensors' `sparse-bitmask` layout of one sparse linear `[rows, cols]` (its
/// `BitmaskTensor`, row-major): `{prefix}.shape` I64 `[2]`; `{prefix}.compressed` the non-zero
/// values in row-major order, in the weight's dtype; `{prefix}.bitmask` U8
/// `[rows, ceil(cols/8)]`, column j of a row at bit j % 8 of byte j / 8 (numpy `packbits`,
/// `bitorder="little"`), set where the value is non-zero; `{prefix}.row_offsets` I64 `[rows]`,
/// where each row's values start in `compressed`. A value whose stored form is zero (an f32
/// that rounds to ±0 in bf16) counts as a zero, as the library's `tensor != 0` on the stored
/// tensor does.
pub fn bitmask_tensors(
    prefix: &str,
    w: &[f32],
    (rows, cols): (usize, usize),
    dtype: DType,
) -> Result<Vec<NamedTensor>> {
    ensure!(
        w.len() == rows * cols,
        "`{prefix}`: {} values for [{rows}, {cols}]",
        w.len()
    );
    let stored = to_f32(dtype, &from_f32(dtype, w)).context("bitmask: float dtype expected")?;
    let width = cols.div_ceil(8);
    let mut bitmask = vec![0u8; rows * width];
    let mut values = Vec::new();
    let mut offsets = Vec::with_capacity(rows);
    for r in 0..rows {
        offsets.push(values.len() as i64);
        for c in 0..cols {
            let v = stored[r * cols + c];
            if v != 0.0 {
                bitmask[r * width + c / 8] |= 1 << (c % 8);
                values.push(v);
            }
        }
    }
    Ok(vec![
        (
            format!("{prefix}.shape"),
            DType::I64,
            vec![2],
            i64s_to_bytes(&[rows as i64, cols as i64]),
        ),
        (
            format!("{prefix}.compressed"),
            dtype,
            vec![values.len()],
            from_f32(dtype, &values),
        ),
        (
            format!("{prefix}.bitmask"),
            DType::U8,
            vec![rows, width],
            bitmask,
        ),
        (
            format!("{prefix}.row_offsets"),
            DType::I64,
            vec![rows],
            i64s_to_bytes(&offsets),
        ),
    ])
}

/// Read a `sparse-bitmask` linear back to its dense `[rows, cols]` values (row-major) and the
/// values' dtype, checking every tensor against the others.
pub fn read_bitmask(get: TensorGetter, prefix: &str) -> Result<(Vec<f32>, DType, (usize, usize))> {
    let (_, shape) = get_i64s(get, &format!("{prefix}.shape"))?;
    ensure!(
        shape.len() == 2 && shape.iter().all(|d| *d > 0),
        "`{prefix}.shape` must hold two positive dims, found {shape:?}"
    );
    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
    let width = cols.div_ceil(8);
    let (mdt, mshape, mask) = get(&format!("{prefix}.bitmask"))?;
    ensure!(
        matches!(mdt, DType::U8 | DType::I8) && mshape == [rows, width],
        "`{prefix}.bitmask` is {} {mshape:?}, expected uint8 [{rows}, {width}]",
        mdt.name()
    );
    let (vdt, _, vbytes) = get(&format!("{prefix}.compressed"))?;
    let values = to_f32(vdt, &vbytes).with_context(|| {
        format!(
            "`{prefix}.compressed`: expected a float tensor, found {}",
            vdt.name()
        )
    })?;
    let (_, offsets) = get_i64s(get, &format!("{prefix}.row_offsets"))?;
    ensure!(
        offsets.len() == rows,
        "`{prefix}.row_offsets` has {} entries for {rows} rows",
        offsets.len()
    );
    let mut w = vec![0f32; rows * cols];
    let mut k = 0usize;
    for r in 0..rows {
        ensure!(
            offsets[r] == k as i64,
            "`{prefix}.row_offsets[{r}]` is {}, the bitmask puts row {r} at {k}",
            offsets[r]
        );
        for c in 0..cols {
            if mask[r * width + c / 8] >> (c % 8) & 1 == 1 {
                let v = *values.get(k).with_context(|| {
                    format!(
                        "`{prefix}.compressed` holds {} values, the bitmask sets more",
                        values.len()
                    )
                })?;
                w[r * cols + c] = v;
                k += 1;
            }
        }
    }
    ensure!(
        k == values.len(),
        "`{prefix}.compressed` holds {} values, the bitmask sets {k}",
        values.len()
    );
    Ok((w, vdt, (rows, cols)))
}

/// The `sparsity_config` block (compressed-tensors' `SparsityCompressionConfig`): `format`
/// `dense` (weights with exact zeros) or `sparse-bitmask`, `global_sparsity` is the measured
/// fraction of zeros over the decoder-layer linears, `sparsity_structure` `2:4` when every group
/// of four consecutive inputs of every sparse linear holds at most two non-zeros (checked on the
/// written values), else `unstructured`.
pub fn sparsity_config(
    global: f64,
    structure: &str,
    dense_linears: &[String],
    format: SparseFormat,
) -> Value {
    let mut ignore: Vec<String> = vec!["lm_head".into()];
    ignore.extend(dense_linears.iter().cloned());
    json!({
        "format": format.name(),
        "global_sparsity": global,
        "ignore": ignore,
        "registry_requires_subclass": false,
        "sparsity_structure": structure,
        "targets": ["Linear"],
    })
}
