//! The stored size of a quantized linear in a packed format, measured by encoding one.

use crate::formats::{Format, Order};
use crate::model::DType;
use anyhow::{bail, Result};

/// The bytes a weight-only linear of `shape` ([out, in], stored as `dtype`) takes in `format`
/// when quantized onto `args` in column order `order`: every tensor the exporter writes for it
/// (codes, scales, zero points, shape, g_idx), measured by encoding one. What a size budget
/// counts, exactly as the report's bits per weight does.
pub fn quantized_bytes(
    format: Format,
    args: &crate::quant::QuantArgs,
    order: Order,
    shape: (usize, usize),
    dtype: DType,
) -> Result<u64> {
    if matches!(format, Format::Dense | Format::Gguf) {
        bail!(
            "a size budget needs a packed export format (`compressed-tensors` or `gptq`): `{}` {}",
            format.name(),
            if format == Format::Dense {
                "stores every weight at its full size"
            } else {
                "types are chosen by the GGUF mix (`gguf_type`, `tensor_types`)"
            }
        );
    }
    let w = ndarray::Array2::from_shape_fn(shape, |(i, j)| ((i * 31 + j * 17) % 13) as f32 - 6.0);
    let sd = crate::quant::scale_dtype_for(dtype);
    let mut q = match args.float {
        Some(_) => {
            crate::quant::float::quantize(w.view(), args, sd, args.global_scale.then_some(1.0))?
        }
        None => crate::backend::rtn(w.view(), args, sd)?,
    };
    q.static_order = order == Order::Static;
    if order == Order::Dynamic {
        let g = args.group_width(shape.1).max(1);
        q.g_idx = Some((0..shape.1).map(|j| (j / g) as i32).collect());
    }
    Ok(super::writer_for(format, None)?
        .packed("m", &q, None)?
        .iter()
        .map(|(_, _, _, b)| b.len() as u64)
        .sum())
}
