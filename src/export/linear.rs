//! How one decoder linear is laid out in each format (packed codes, factors, bitmask, dense or
//! a raw copy), and its PEFT adapter beside the checkpoint.

use super::writer::SafetensorsWriter;
use super::Exporter;
use crate::formats::compressed_tensors::SparseFormat;
use crate::formats::{Format, Order};
use crate::model::layer::{Linear, Repr};
use crate::model::Checkpoint;
use crate::model::DType;
use crate::safetensors_file::from_f32;
use anyhow::{bail, Context, Result};

/// The tensors `format` stores a quantized linear as: compressed-tensors `pack-quantized`,
/// `int-quantized` (8-bit weights whose input `input` is quantized too) or a float format;
/// GPTQ v1's qweight / qzeros / scales / g_idx.
pub(crate) fn quantized_tensors(
    format: Format,
    prefix: &str,
    q: &crate::quant::QuantizedLinear,
    input: Option<&crate::quant::QuantArgs>,
) -> Result<Vec<crate::formats::NamedTensor>> {
    use crate::formats::compressed_tensors as ct;
    match format {
        Format::CompressedTensors if q.args.float.is_some() => ct::float::float_tensors(prefix, q),
        Format::CompressedTensors if ct::int_quantized(&q.args, input) => {
            ct::int_quantized_tensors(prefix, q)
        }
        Format::CompressedTensors => ct::compressed_tensors_tensors(prefix, q),
        Format::Gptq => crate::formats::gptq::gptq_tensors(prefix, q),
        Format::Dense | Format::Gguf => {
            bail!("format `{}` stores no packed linears", format.name())
        }
    }
}

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
    Ok(quantized_tensors(format, "m", &q, None)?
        .iter()
        .map(|(_, _, _, b)| b.len() as u64)
        .sum())
}

impl Exporter {
    /// Lay out one linear as its representation says: packed codes (quantized formats), two
    /// factors (`weight_u`, `weight_v`; the `dense` format multiplies them back), or dense
    /// values — copied byte for byte when no pass changed it.
    pub(super) fn write_linear(
        &mut self,
        ckpt: &Checkpoint,
        prefix: &str,
        lin: &Linear,
    ) -> Result<()> {
        let wname = format!("{prefix}.weight");
        // an adapter is written beside the checkpoint (PEFT LoRA), except by `dense`, which
        // writes the merged matrix
        let separate = lin.adapter().is_some() && self.format != Format::Dense;
        if lin.adapter().is_some() && self.format == Format::Gguf {
            bail!("export: `{prefix}` carries a low-rank adapter (eora); GGUF export has no adapter file: use `format: compressed-tensors` (PEFT adapter beside it) or `dense` (merged)");
        }
        self.sparsity.add(prefix, lin);
        self.linears.push(prefix.to_string());
        if self.format == Format::Gguf {
            if matches!(lin.repr(), Repr::Factored { .. }) {
                bail!("export: `{prefix}` is factored (svd); GGUF stores whole weight matrices: use `format: dense` or drop the low-rank pass");
            }
            if lin.quant().is_some() {
                bail!("export: `{prefix}` was quantized onto an integer grid by a pass; GGUF export encodes the weights onto ggml's grids itself (llama.cpp's reference encoders), so a gguf pipeline runs without rtn/gptq passes");
            }
            if lin.act_quant().is_some() {
                bail!("export: `{prefix}` quantizes its input activations (W8A8); GGUF has no such scheme");
            }
            let w = lin.weight();
            let v = w
                .as_standard_layout()
                .into_owned()
                .into_raw_vec_and_offset()
                .0;
            if lin.ggml().is_none() {
                self.unquantized.push(prefix.to_string());
            }
            let imp = lin.importance().map(|i| i.to_vec());
            let codes = lin.ggml().cloned();
            self.gguf_add(
                ckpt,
                &wname,
                v,
                &[w.nrows(), w.ncols()],
                imp.as_deref(),
                codes.as_ref(),
            )?;
            // attention biases (qwen2; llama's optional ones) as F32 vectors, Q/K permuted
            // as their rows are
            if let Some(b) = &lin.bias {
                self.gguf_add(
                    ckpt,
                    &format!("{prefix}.bias"),
                    b.clone(),
                    &[b.len()],
                    None,
                    None,
                )?;
            }
            return Ok(());
        }
        let bitmask = self.sparse_format == SparseFormat::Bitmask && lin.mask().is_some();
        if bitmask && lin.quant().is_some() {
            bail!("export: `{prefix}` is sparse and quantized; `sparse_format: bitmask` stores unquantized sparse weights (compressed-tensors has no bitmask layout for packed integer weights): use `sparse_format: dense`");
        }
        match (lin.repr(), lin.quant(), self.format) {
            (Repr::Factored { u, v }, _, Format::CompressedTensors | Format::Gptq) => {
                if u.quant.is_some() || v.quant.is_some() {
                    bail!("export: `{prefix}` has quantized factors; this format stores factors in floating point only");
                }
                for (suffix, f) in [("weight_u", u), ("weight_v", v)] {
                    let vals = f.values.as_standard_layout();
                    let bytes = from_f32(lin.dtype, vals.as_slice().context("factor")?);
                    let shape = [f.values.nrows(), f.values.ncols()];
                    self.w()?
                        .add(&format!("{prefix}.{suffix}"), lin.dtype, &shape, &bytes)?;
                }
                self.low_rank.push((prefix.to_string(), u.values.ncols()));
                self.unquantized.push(prefix.to_string());
            }
            (_, None, Format::CompressedTensors) if bitmask => {
                let w = if separate {
                    lin.base_weight()
                } else {
                    lin.weight()
                };
                let s = w.as_slice().context("weight not contiguous")?;
                let dims = (w.nrows(), w.ncols());
                for (n, dt, shape, bytes) in
                    crate::formats::compressed_tensors::bitmask_tensors(prefix, s, dims, lin.dtype)?
                {
                    self.w()?.add(&n, dt, &shape, &bytes)?;
                }
                self.unquantized.push(prefix.to_string());
            }
            (_, Some(q), Format::CompressedTensors) => {
                let input = lin.act_quant().and_then(|a| a.args());
                let tensors = quantized_tensors(self.format, prefix, q, input.as_ref())?;
                for (n, dt, shape, bytes) in tensors {
                    self.w()?.add(&n, dt, &shape, &bytes)?;
                }
                self.inputs.push(input);
                self.quantized
                    .push((prefix.to_string(), q.args.clone(), Order::of(q)));
            }
            (_, Some(q), Format::Gptq) => {
                let ts = self.true_sequential.unwrap_or(true) && q.true_sequential;
                self.true_sequential = Some(ts);
                for (n, dt, shape, bytes) in quantized_tensors(self.format, prefix, q, None)? {
                    self.w()?.add(&n, dt, &shape, &bytes)?;
                }
                self.quantized
                    .push((prefix.to_string(), q.args.clone(), Order::of(q)));
            }
            (_, q, _) => {
                if q.is_none() {
                    self.unquantized.push(prefix.to_string());
                }
                if lin.is_modified() || !ckpt.has(&wname) {
                    let w = if separate {
                        lin.base_weight()
                    } else {
                        lin.weight()
                    };
                    let s = w.as_slice().context("weight not contiguous")?;
                    let shape = [w.nrows(), w.ncols()];
                    let bytes = from_f32(lin.dtype, s);
                    self.w()?.add(&wname, lin.dtype, &shape, &bytes)?;
                } else {
                    self.copy_raw(ckpt, &wname)?;
                }
            }
        }
        let bname = format!("{prefix}.bias");
        match (&lin.bias, lin.is_modified()) {
            // a pass may have changed the bias (a folded scale, distillation): write its values
            (Some(b), true) if ckpt.has(&bname) => {
                let dt = ckpt.info(&bname)?.0.dtype;
                let bytes = from_f32(dt, b);
                self.w()?.add(&bname, dt, &[b.len()], &bytes)?;
            }
            _ if ckpt.has(&bname) => self.copy_raw(ckpt, &bname)?,
            _ => {}
        }
        if let (true, Some(ad)) = (separate, lin.adapter()) {
            self.write_adapter(prefix, lin.dtype, ad)?;
        }
        Ok(())
    }

    /// A linear's adapter into `adapter/adapter_model.safetensors`, under PEFT's names.
    fn write_adapter(
        &mut self,
        prefix: &str,
        dtype: DType,
        ad: &crate::model::layer::Adapter,
    ) -> Result<()> {
        use crate::formats::peft;
        if self.adapter_writer.is_none() {
            let d = self.dir.join(peft::DIR);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            self.adapter_writer =
                Some(SafetensorsWriter::new(&d, usize::MAX).with_stem(peft::STEM));
        }
        let w = self
            .adapter_writer
            .as_mut()
            .context("internal: adapter writer")?;
        let (an, bn) = peft::tensor_names(prefix);
        for (name, m) in [(an, &ad.a), (bn, &ad.b)] {
            let v = m.as_standard_layout();
            let bytes = from_f32(dtype, v.as_slice().context("adapter")?);
            w.add(&name, dtype, &[m.nrows(), m.ncols()], &bytes)?;
        }
        self.adapters.push((prefix.to_string(), ad.rank()));
        Ok(())
    }
}
