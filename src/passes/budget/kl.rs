//! The end-to-end sensitivity of a size budget (`sensitivity: kl`): how far the model's
//! next-token distribution moves when one layer's linears take a candidate grid.
//!
//! The local damages (‖ΔW X‖² relative or absolute) compare linears inside a layer well but
//! weigh layers against each other blindly: an error in one layer may vanish downstream, in
//! another it is amplified. Measured end to end on a calibration subset:
//!
//!   KL_l(c) = 1/N Σ_t Σ_v p(v | t) · (log p(v | t) − log q_{l,c}(v | t))
//!
//! where p is the dense model and q_{l,c} the dense model with every selected linear of layer l
//! on candidate c (GPTQ onto its grid, as the scan computed it). One forward of layers l..L per
//! (layer, candidate); the dense hidden states at every layer's input and the dense
//! log-probabilities are computed once. The knapsack needs a damage per linear: layer l's
//! KL is shared among its linears in proportion to their relative output errors,
//!
//!   D_i(c) = KL_l(c) · r_i(c) / Σ_{j ∈ l} r_j(c),
//!
//! so the layers are weighed by what they do to the output and the linears inside a layer by
//! their local error (an additive model of the damage, which the knapsack assumes anyway).

use crate::model::layer::{LayerWeights, Site};
use crate::model::llama::{Act, DecoderLayer, Model};
use crate::model::Checkpoint;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// The dense model and what it computes on the subset, kept for the scan.
pub(super) struct Probe {
    model: Model<'static>,
    /// The subset's hidden states at the input of each layer: `[layer][window]`.
    inputs: Vec<Vec<Act>>,
    /// The dense model's log-probabilities per window, `[tokens, vocab]` row-major.
    dense: Vec<Vec<f32>>,
}

impl Probe {
    /// The first calibration windows holding at least `tokens` tokens (at least one window).
    pub(super) fn new(ckpt: &Checkpoint, windows: &[Vec<u32>], tokens: usize) -> Result<Self> {
        let mut subset = Vec::new();
        let mut n = 0;
        for w in windows {
            if n >= tokens && !subset.is_empty() {
                break;
            }
            n += w.len();
            subset.push(w);
        }
        ensure!(
            !subset.is_empty(),
            "no calibration window for the KL subset"
        );
        let max_t = subset.iter().map(|w| w.len()).max().unwrap_or(1);
        let model = Model::load(ckpt, max_t)?;
        let layers = model.config.num_layers;
        let vocab = model.config.vocab_size;
        let mut inputs = vec![Vec::new(); layers];
        let mut dense = Vec::new();
        for w in subset {
            let mut x = model.outer.embed(w, 1, w.len())?;
            for (l, slot) in inputs.iter_mut().enumerate() {
                slot.push(x.clone());
                x = model.forward_layer(l, &x)?;
            }
            let mut lp = model.outer.logits(&x);
            lp.par_chunks_mut(vocab).for_each(log_softmax);
            dense.push(lp);
        }
        Ok(Probe {
            model,
            inputs,
            dense,
        })
    }

    /// Tokens in the subset.
    pub(super) fn tokens(&self) -> usize {
        self.inputs
            .first()
            .map_or(0, |v| v.iter().map(|a| a.b * a.t).sum())
    }

    /// Mean KL(p_dense ‖ q) per token, q the model with layer `l` as `layer` (the other layers
    /// dense).
    pub(super) fn kl(&self, l: usize, layer: &LayerWeights) -> Result<f64> {
        let cfg = &self.model.config;
        let vocab = cfg.vocab_size;
        let mut no_hook = |_: Site, _: &[f32], _: usize, _: usize| Ok(());
        let (mut total, mut n) = (0f64, 0usize);
        for (x, p) in self.inputs[l].iter().zip(&self.dense) {
            let mut y = DecoderLayer::new(layer, cfg).forward(x, &self.model.rope, &mut no_hook)?;
            for k in l + 1..cfg.num_layers {
                y = self.model.forward_layer(k, &y)?;
            }
            let mut q = self.model.outer.logits(&y);
            q.par_chunks_mut(vocab).for_each(log_softmax);
            total += p
                .par_chunks(vocab)
                .zip(q.par_chunks(vocab))
                .map(|(p, q)| kl_row(p, q))
                .sum::<f64>();
            n += y.b * y.t;
        }
        Ok((total / n.max(1) as f64).max(0.0))
    }
}

/// Log-probabilities of a row of logits, in place (max-shifted, summed in f64).
fn log_softmax(row: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
    let lz = m as f64 + z.ln();
    row.iter_mut().for_each(|v| *v = (*v as f64 - lz) as f32);
}

/// KL(p ‖ q) of two rows of log-probabilities.
fn kl_row(p: &[f32], q: &[f32]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(&lp, &lq)| {
            let pp = (lp as f64).exp();
            pp * (lp as f64 - lq as f64)
        })
        .sum()
}

/// Layer `l`'s KL shared among its linears by their relative errors: `kl[c]` the layer's KL
/// under candidate c, `rel[i][c]` linear i's relative output error; returns D_i(c).
pub(super) fn shares(kl: &[f64], rel: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let k = kl.len();
    let sums: Vec<f64> = (0..k)
        .map(|c| rel.iter().map(|r| r.get(c).copied().unwrap_or(0.0)).sum())
        .collect();
    rel.iter()
        .map(|r| {
            (0..k)
                .map(|c| {
                    let share = if sums[c] > 0.0 {
                        r.get(c).copied().unwrap_or(0.0) / sums[c]
                    } else {
                        1.0 / rel.len().max(1) as f64
                    };
                    kl[c] * share
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_a_distribution_with_itself_is_zero_and_matches_the_definition() {
        let mut p = vec![1.0f32, 2.0, -0.5, 0.25];
        let mut q = vec![0.5f32, 2.5, -1.0, 0.0];
        log_softmax(&mut p);
        log_softmax(&mut q);
        assert!(kl_row(&p, &p).abs() < 1e-12);
        // the definition with probabilities
        let pp: Vec<f64> = p.iter().map(|v| (*v as f64).exp()).collect();
        let qq: Vec<f64> = q.iter().map(|v| (*v as f64).exp()).collect();
        assert!((pp.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        let want: f64 = pp.iter().zip(&qq).map(|(a, b)| a * (a / b).ln()).sum();
        assert!(
            (kl_row(&p, &q) - want).abs() < 1e-6,
            "{} vs {want}",
            kl_row(&p, &q)
        );
        assert!(kl_row(&p, &q) > 0.0);
    }

    /// On the reference model: the dense layer moves nothing, and a coarser grid on a layer
    /// moves the output distribution more than a finer one.
    #[test]
    fn kl_is_zero_for_the_dense_layer_and_grows_with_coarser_grids() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/ref-llama-9m");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let vocab = ckpt.config.vocab_size as u32;
        let windows: Vec<Vec<u32>> = (0..2)
            .map(|w| (0..64u32).map(|i| (i * 37 + w * 11 + 5) % vocab).collect())
            .collect();
        let probe = Probe::new(&ckpt, &windows, 100).unwrap();
        assert_eq!(probe.tokens(), 128);
        let dense = LayerWeights::load(&ckpt, 1).unwrap();
        assert!(probe.kl(1, &dense).unwrap() < 1e-6);
        let kl_at = |bits: u32| {
            let args = crate::quant::QuantArgs::int(
                bits,
                true,
                crate::quant::Strategy::Group,
                32,
                crate::quant::Observer::MinMax,
            );
            let mut layer = dense.clone();
            for lin in layer.linears.values_mut() {
                let q = crate::backend::rtn(
                    lin.weight().view(),
                    &args,
                    crate::safetensors_file::DType::BF16,
                )
                .unwrap();
                lin.set_weight(q.dequantize()).unwrap();
            }
            probe.kl(1, &layer).unwrap()
        };
        let (k2, k8) = (kl_at(2), kl_at(8));
        assert!(k2 > 10.0 * k8 && k8 > 0.0, "W2 {k2}, W8 {k8}");
    }

    #[test]
    fn shares_split_each_layers_kl_by_relative_error() {
        let kl = [0.3, 0.1];
        let rel = vec![vec![1.0, 0.0], vec![2.0, 0.0]];
        let d = shares(&kl, &rel);
        assert!((d[0][0] - 0.1).abs() < 1e-12 && (d[1][0] - 0.2).abs() < 1e-12);
        // no local error anywhere: split evenly
        assert!((d[0][1] - 0.05).abs() < 1e-12 && (d[1][1] - 0.05).abs() < 1e-12);
        let total: f64 = d.iter().map(|r| r[0]).sum();
        assert!((total - kl[0]).abs() < 1e-12);
    }
}
