//! What a linear computes and costs: its forward, the bf16 packing and release for evaluation,
//! the same-function check the engine relies on, and its resident and stored bytes.

use super::repr::Repr;
use super::Linear;
use crate::model::ops;
use crate::safetensors_file::DType;
use anyhow::{ensure, Context, Result};
use ndarray::Array2;

impl Linear {
    /// y = x·Wᵀ + b for x [n, in] row-major, through the representation.
    /// Compute this linear's product in bf16 from now on (evaluation with `precision: bf16`):
    /// the weight is rounded and packed once. Factored linears keep f32 factors (their two
    /// thin products are a small part of the work).
    pub fn pack_bf16(&mut self) {
        if self.bf16.is_some() {
            return;
        }
        if let Repr::Quantized(q) = &self.repr {
            // the kernel reads the codes (the same values as packing the dequantized weight)
            self.bf16 = Some(std::sync::Arc::new(
                crate::model::bf16::PackedBf16::pack_quantized(q),
            ));
        } else if !matches!(self.repr, Repr::Factored { .. }) {
            if let Some(ws) = self.weight.as_slice() {
                let (out, k) = self.weight.dim();
                self.bf16 = Some(std::sync::Arc::new(crate::model::bf16::PackedBf16::pack(
                    ws, out, k,
                )));
            }
        }
    }

    /// Bytes of weight data this linear holds in memory: its f32 values (with an adapter's
    /// merged matrix and factors), its integer codes and its packed bf16 form.
    pub fn resident_bytes(&self) -> usize {
        let codes = match &self.repr {
            Repr::Quantized(q) => q.codes.len() + 4 * q.scales.len(),
            _ => 0,
        };
        let adapter = self
            .adapter
            .as_ref()
            .map_or(0, |(a, m)| 4 * (a.a.len() + a.b.len() + m.len()));
        4 * self.weight.len() + codes + adapter + self.bf16.as_ref().map_or(0, |p| p.bytes())
    }

    /// Evaluation only: once packed for bf16 ([`Linear::pack_bf16`]), drop the f32 values the
    /// forward no longer reads (the weight, an adapter's merged matrix); the packed form and
    /// the adapter's factors remain. Afterwards only [`Linear::forward`], [`Linear::shape`]
    /// and the metadata may be used ([`Linear::weight`] panics). No effect on an unpacked
    /// linear.
    pub fn release_values(&mut self) {
        if self.bf16.is_none() || self.released.is_some() {
            return;
        }
        self.released = Some(self.weight.dim());
        self.weight = Array2::zeros((0, 0));
        if let Some((_, merged)) = &mut self.adapter {
            *merged = Array2::zeros((0, 0));
        }
        if let Repr::Quantized(q) = &mut self.repr {
            // the packed panels hold the codes
            q.codes = Vec::new();
        }
    }

    /// Whether [`Linear::forward`] of `self` and of `o` compute the same function bit for bit:
    /// every field the forward reads holds the same bits (the computed matrix or the factors,
    /// the adapter, the bias, the input quantizer, the bf16 packing). Conservative: released
    /// values or different packings answer `false`. The engine re-uses activations computed
    /// before a pass ran only while this holds for every linear they went through.
    pub fn same_forward(&self, o: &Linear) -> bool {
        fn same(a: &Array2<f32>, b: &Array2<f32>) -> bool {
            a.dim() == b.dim()
                && a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        }
        let factors = match (&self.repr, &o.repr) {
            (Repr::Factored { u, v }, Repr::Factored { u: u2, v: v2 }) => {
                same(&u.values, &u2.values) && same(&v.values, &v2.values)
            }
            (Repr::Factored { .. }, _) | (_, Repr::Factored { .. }) => false,
            _ => true,
        };
        let adapters = match (&self.adapter, &o.adapter) {
            (None, None) => true,
            (Some((a, _)), Some((b, _))) => same(&a.a, &b.a) && same(&a.b, &b.b),
            _ => false,
        };
        let bias = match (&self.bias, &o.bias) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            _ => false,
        };
        let packed = match (&self.bf16, &o.bf16) {
            (None, None) => true,
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        };
        self.released.is_none()
            && o.released.is_none()
            && factors
            && adapters
            && bias
            && packed
            && self.act_quant == o.act_quant
            && same(&self.weight, &o.weight)
    }

    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let (out, k) = self.shape();
        ensure!(
            x.len() == n * k,
            "input has {} values, expected {n}×{k}",
            x.len()
        );
        let mut xq;
        let x = match self.act_quant {
            Some(a) => {
                xq = x.to_vec();
                a.apply(&mut xq, k);
                &xq[..]
            }
            None => x,
        };
        let mut y = match &self.repr {
            Repr::Factored { u, v } => {
                let r = v.values.nrows();
                let vs = v.values.as_slice().context("factor not contiguous")?;
                let us = u.values.as_slice().context("factor not contiguous")?;
                let h = ops::linear(x, n, k, vs, r, None);
                ops::linear(&h, n, r, us, out, self.bias.as_deref())
            }
            _ => match &self.bf16 {
                Some(p) => p.matmul(x, n, self.bias.as_deref()),
                None => {
                    let ws = self.weight.as_slice().context("weight not contiguous")?;
                    ops::linear(x, n, k, ws, out, self.bias.as_deref())
                }
            },
        };
        if let Some((ad, _)) = &self.adapter {
            // + (x·Aᵀ)·Bᵀ
            let r = ad.rank();
            let a = ad.a.as_slice().context("adapter not contiguous")?;
            let b = ad.b.as_slice().context("adapter not contiguous")?;
            let h = ops::linear(x, n, k, a, r, None);
            let d = ops::linear(&h, n, r, b, out, None);
            y.iter_mut().zip(&d).for_each(|(y, d)| *y += d);
        }
        Ok(y)
    }

    /// Exact bytes of the weight as the compressed-tensors exporter stores it (bias excluded):
    /// dense values in the checkpoint dtype (a pruned linear is stored dense, zeros included),
    /// packed codes with their scales, zero points and g_idx, or both factors; plus the
    /// adapter's A and B in the checkpoint dtype (stored in the adapter file beside it). A
    /// weight a pass encoded as ggml blocks counts those blocks (what a GGUF export writes).
    pub fn bytes(&self) -> usize {
        self.not_released();
        fn of(repr: &Repr, w: &Array2<f32>, dtype: DType) -> usize {
            match repr {
                Repr::Dense => w.len() * dtype.size(),
                Repr::Quantized(q) => crate::formats::compressed_tensors::stored_bytes(q),
                Repr::Sparse { inner, .. } => of(inner, w, dtype),
                Repr::Factored { u, v } => [u, v]
                    .iter()
                    .map(|f| match &f.quant {
                        Some(q) => crate::formats::compressed_tensors::stored_bytes(q),
                        None => f.values.len() * dtype.size(),
                    })
                    .sum(),
            }
        }
        let adapter = self
            .adapter()
            .map_or(0, |a| (a.a.len() + a.b.len()) * self.dtype.size());
        if let Some(g) = &self.ggml {
            return g.bytes.len() + adapter;
        }
        of(&self.repr, &self.weight, self.dtype) + adapter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linear::{Adapter, Factor, Mask};

    fn rand(shape: (usize, usize), seed: u64) -> Array2<f32> {
        let mut s = seed;
        Array2::from_shape_fn(shape, |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
    }

    fn naive(x: &[f32], n: usize, w: &Array2<f32>) -> Vec<f32> {
        let (out, k) = w.dim();
        let mut y = vec![0f32; n * out];
        for i in 0..n {
            for o in 0..out {
                y[i * out + o] = (0..k).map(|j| x[i * k + j] * w[[o, j]]).sum();
            }
        }
        y
    }

    #[test]
    fn factored_forward_is_the_product() {
        let (u, v) = (rand((12, 5), 1), rand((5, 9), 2));
        let mut l = Linear::dense(rand((12, 9), 3), None, DType::F32);
        l.set_factored(
            Factor {
                values: u.clone(),
                quant: None,
            },
            Factor {
                values: v.clone(),
                quant: None,
            },
        )
        .unwrap();
        let w = u.dot(&v);
        for (a, b) in l.weight().iter().zip(w.iter()) {
            assert!((a - b).abs() < 1e-5);
        }
        let x = rand((7, 9), 4).into_raw_vec_and_offset().0;
        let y = l.forward(&x, 7).unwrap();
        for (a, b) in y.iter().zip(naive(&x, 7, &w)) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
        assert!(l.is_modified());
        assert_eq!(l.bytes(), (12 * 5 + 5 * 9) * 4);
    }

    #[test]
    fn adapter_forward_is_base_plus_low_rank() {
        let args = crate::quant::QuantArgs::int(
            3,
            true,
            crate::quant::Strategy::Group,
            8,
            crate::quant::Observer::MinMax,
        );
        let w = rand((10, 16), 11);
        let mut l = Linear::dense(
            w.clone(),
            Some(rand((1, 10), 15).into_raw_vec_and_offset().0),
            DType::F32,
        );
        let q = crate::quant::quantize_rtn(w.view(), &args, DType::F32).unwrap();
        l.set_quantized(q).unwrap();
        let base = l.weight().clone();
        let (a, b) = (rand((3, 16), 12), rand((10, 3), 13));
        // a wrong shape is refused
        assert!(l
            .clone()
            .set_adapter(Adapter {
                a: b.clone(),
                b: a.clone()
            })
            .is_err());
        l.set_adapter(Adapter {
            a: a.clone(),
            b: b.clone(),
        })
        .unwrap();
        let merged = &base + &b.dot(&a);
        for (p, q) in l.weight().iter().zip(merged.iter()) {
            assert!((p - q).abs() < 1e-5);
        }
        assert_eq!(l.base_weight(), &base);
        let x = rand((5, 16), 14).into_raw_vec_and_offset().0;
        let y = l.forward(&x, 5).unwrap();
        let bias = l.bias.clone().unwrap();
        for (i, (p, q)) in y.iter().zip(naive(&x, 5, &merged)).enumerate() {
            let q = q + bias[i % 10];
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
        // codes + A + B
        assert_eq!(
            l.bytes(),
            crate::formats::compressed_tensors::stored_bytes(l.quant().unwrap()) + (48 + 30) * 4
        );
        // the adapter comes last
        assert!(l.set_weight(base.clone()).is_err());
        assert!(l
            .set_adapter(Adapter {
                a: a.clone(),
                b: b.clone()
            })
            .is_err());
    }

    #[test]
    fn mask_zeroes_and_survives_quantization() {
        let mut l = Linear::dense(rand((4, 8), 5), None, DType::BF16);
        let keep: Vec<bool> = (0..32).map(|i| i % 4 < 2).collect();
        l.set_mask(Mask::new((4, 8), keep.clone()).unwrap())
            .unwrap();
        assert!(l.weight().iter().zip(&keep).all(|(v, k)| *k || *v == 0.0));
        assert_eq!(l.mask().unwrap().sparsity(), 0.5);
        // dense values that break the mask are refused
        assert!(l.set_weight(rand((4, 8), 6)).is_err());
        let args = crate::quant::QuantArgs::int(
            4,
            false,
            crate::quant::Strategy::Group,
            8,
            crate::quant::Observer::MinMax,
        );
        let q = crate::quant::quantize_rtn(l.weight().view(), &args, DType::BF16).unwrap();
        l.set_quantized(q).unwrap();
        assert!(l.quant().is_some() && l.mask().is_some());
        let x = rand((3, 8), 7).into_raw_vec_and_offset().0;
        let y = l.forward(&x, 3).unwrap();
        for (a, b) in y.iter().zip(naive(&x, 3, l.weight())) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}
