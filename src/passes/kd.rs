//! Block-wise knowledge distillation (`kd`): after the compressing passes of a layer, tune the
//! block's continuous parameters so that the compressed block, fed the compressed model's own
//! hidden states, reproduces the dense model's block output.
//!
//! This is the block-reconstruction objective of BRECQ (Li et al., ICLR 2021, eq. 7, with the
//! Fisher weighting replaced by the plain squared error) and OmniQuant (Shao et al., ICLR 2024,
//! eq. 1), with the teacher taken on the *teacher* stream as in EfficientQAT's Block-AP
//! (Chen et al. 2024, §3.2): for decoder layer l with student input X̃_l (what the compressed
//! layers before produce) and teacher output Y_l = F_l(X_l; W) (the dense layer on the dense
//! stream),
//!
//!   min_θ  L(θ) = 1/(N·d) · Σ_windows ‖F_l(X̃_l; Q, θ) − Y_l‖²_F                    (1)
//!
//! so the layer also absorbs the error its inputs already carry. θ are the continuous
//! parameters the compression left: RMSNorm weights, biases, quantization scales s (and zero
//! points z on asymmetric grids) of W = (Q − z)·s with the integer codes Q fixed — the
//! straight-through estimator for round(z) (Bengio et al. 2013) — and low-rank factors U, V of
//! W = U·V. Sparse linears keep their masks. Gradients come from the block's hand-written
//! backward (`model/backward/`).
//!
//! Optimisation: Adam (Kingma & Ba 2015, Algorithm 1) with bias-corrected moments,
//!
//!   m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − η_θ · m̂ / (√v̂ + ε)             (2)
//!
//! over `steps` steps, each on `batch` calibration windows drawn without replacement by a
//! ChaCha8 generator seeded with (`seed`, layer). The step size is relative: η_θ = `lr` ×
//! RMS(θ₀) per tensor (1 for zero points, which count grid steps), so one `lr` suits norm
//! weights near 1 and scales near 10⁻² alike.
//!
//! After the last step the parameters are rounded as the exporters store them (scales to the
//! scale dtype, norms, biases and factors to their storage dtype, zero points to integers on
//! the grid) and the block's relative output error ‖F(X̃) − Y‖² / ‖Y‖² over *all* calibration
//! windows is measured with the rounded values (eq. 1 on the whole set). If it is not lower
//! than before distillation, the layer keeps its original parameters and the record says so:
//! distillation never makes a layer worse on the calibration set.

use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use crate::model::backward::{Block, Field, Group, Params};
use crate::model::layer::{Factor, LayerWeights};
use crate::model::llama::Act;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdSpec {
    /// Adam step size, relative to each tensor's RMS (eq. 2).
    #[serde(default = "d_lr")]
    pub lr: f32,
    /// Adam steps per layer.
    #[serde(default = "d_steps")]
    pub steps: usize,
    /// Calibration windows per step.
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Seed of the window draws.
    #[serde(default)]
    pub seed: u64,
    /// Parameter groups to tune: `norms`, `scales`, `zeros`, `factors`, `biases` (default:
    /// all of them; a group the layer does not have is skipped).
    #[serde(default = "d_params")]
    pub params: Vec<Group>,
}

fn d_lr() -> f32 {
    5e-3
}
fn d_steps() -> usize {
    50
}
fn d_batch() -> usize {
    4
}
fn d_params() -> Vec<Group> {
    vec![
        Group::Norms,
        Group::Scales,
        Group::Zeros,
        Group::Factors,
        Group::Biases,
    ]
}

impl KdSpec {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0) {
            bail!("field `lr` must be in (0, 1), found {}", self.lr);
        }
        if self.steps == 0 {
            bail!("field `steps` must be at least 1");
        }
        if self.batch == 0 {
            bail!("field `batch` must be at least 1");
        }
        if self.params.is_empty() {
            bail!("field `params` must name at least one of norms, scales, zeros, factors, biases");
        }
        Ok(())
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

pub struct Kd {
    spec: KdSpec,
}

impl Kd {
    pub fn new(spec: &KdSpec) -> Result<Self> {
        spec.validate()?;
        Ok(Kd { spec: spec.clone() })
    }
}

/// Window `s` of batch `a` as a batch of one.
fn window(a: &Act, s: usize) -> Act {
    let n = a.data.len() / a.b.max(1);
    Act {
        data: a.data[s * n..(s + 1) * n].to_vec(),
        b: 1,
        t: a.t,
    }
}

/// ‖F(X̃) − Y‖² / ‖Y‖² over every window, with `layer`'s parameters (the engine's forward).
fn rel_error(ctx: &LayerCtx, layer: &LayerWeights, teacher_out: &[Act]) -> Result<f64> {
    let ys = ctx.block_output(layer)?;
    let (mut num, mut den) = (0f64, 0f64);
    for (y, t) in ys.iter().zip(teacher_out) {
        for (a, b) in y.data.iter().zip(&t.data) {
            num += ((*a - *b) as f64).powi(2);
            den += (*b as f64).powi(2);
        }
    }
    Ok(num / den.max(f64::MIN_POSITIVE))
}

/// Adam's state (eq. 2) for a parameter set.
pub struct Adam {
    m: Params,
    v: Params,
    /// η_θ per tensor: lr × RMS of its starting values (1 for zero points).
    step: Vec<f64>,
    t: i32,
}

impl Adam {
    pub fn new(p: &Params, lr: f32) -> Self {
        let step = p
            .list
            .iter()
            .map(|q| {
                let rms = (q.values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
                    / q.values.len().max(1) as f64)
                    .sqrt();
                let unit = if q.field == Field::Zeros || rms == 0.0 {
                    1.0
                } else {
                    rms
                };
                lr as f64 * unit
            })
            .collect();
        Adam {
            m: p.zeros_like(),
            v: p.zeros_like(),
            step,
            t: 0,
        }
    }

    /// One update of `p` with gradient `g`.
    pub fn update(&mut self, p: &mut Params, g: &Params) {
        self.t += 1;
        let (c1, c2) = (1.0 - BETA1.powi(self.t), 1.0 - BETA2.powi(self.t));
        for (i, q) in p.list.iter_mut().enumerate() {
            let (m, v, g) = (
                &mut self.m.list[i].values,
                &mut self.v.list[i].values,
                &g.list[i].values,
            );
            for j in 0..q.values.len() {
                let gj = g[j] as f64;
                let mj = BETA1 * m[j] as f64 + (1.0 - BETA1) * gj;
                let vj = BETA2 * v[j] as f64 + (1.0 - BETA2) * gj * gj;
                m[j] = mj as f32;
                v[j] = vj as f32;
                let upd = self.step[i] * (mj / c1) / ((vj / c2).sqrt() + ADAM_EPS);
                q.values[j] = (q.values[j] as f64 - upd) as f32;
            }
        }
    }
}

/// Loss (1) on the windows `pick` and its gradient: Σ‖F − Y‖² / (elements), summed over the
/// windows in order.
pub fn loss_and_grad(
    layer: &LayerWeights,
    cfg: &crate::model::ModelConfig,
    rope: &crate::model::llama::Rope,
    p: &Params,
    xs: &[Act],
    ys: &[Act],
) -> Result<(f64, Params)> {
    let block = Block::new(layer, cfg, p)?;
    let total: usize = ys.iter().map(|y| y.data.len()).sum();
    let mut grads = p.zeros_like();
    let mut loss = 0f64;
    for (x, yt) in xs.iter().zip(ys) {
        let (y, tape) = block.forward(x, rope)?;
        let mut dy = vec![0f32; y.len()];
        for ((d, a), b) in dy.iter_mut().zip(&y).zip(&yt.data) {
            let e = a - b;
            loss += (e as f64) * (e as f64);
            *d = 2.0 * e / total as f32;
        }
        block.backward(&tape, &dy, rope, &mut grads)?;
    }
    Ok((loss / total as f64, grads))
}

/// `layer` with the tuned values, rounded as the exporters store them.
pub fn with_params(layer: &LayerWeights, p: &Params) -> Result<LayerWeights> {
    let mut out = layer.clone();
    for (name, (v, dt)) in out.norms.iter_mut() {
        if let Some(x) = p.get(name, Field::Norm) {
            *v = x.iter().map(|w| crate::quant::round_to(*dt, *w)).collect();
            out.norms_modified = true;
        }
    }
    for (name, lin) in out.linears.iter_mut() {
        if let Some(b) = p.get(name, Field::Bias) {
            let dt = lin.dtype;
            lin.set_bias(b.iter().map(|v| crate::quant::round_to(dt, *v)).collect())?;
        }
        let (s, z) = (p.get(name, Field::Scales), p.get(name, Field::Zeros));
        if s.is_some() || z.is_some() {
            let mut q = lin
                .quant()
                .with_context(|| format!("`{name}`: scales for a linear without codes"))?
                .clone();
            if let Some(s) = s {
                // stored in the scale dtype; a scale is never 0 (nor changes sign): at least
                // the dtype's eps in magnitude, as compressed-tensors stores a zero scale
                let eps = crate::quant::dtype_eps(q.scale_dtype);
                q.scales = s
                    .iter()
                    .zip(&q.scales)
                    .map(|(v, old)| {
                        let m = crate::quant::round_to(q.scale_dtype, v.abs().max(eps));
                        if *old < 0.0 {
                            -m
                        } else {
                            m
                        }
                    })
                    .collect();
            }
            if let (Some(z), Some(zq)) = (z, q.zeros.as_mut()) {
                let (lo, hi) = crate::quant::qrange(q.args.bits);
                for (a, v) in zq.iter_mut().zip(z) {
                    *a = (v.round_ties_even() as i32).clamp(lo, hi) as i8;
                }
            }
            lin.set_quantized(q)?;
        }
        if let (Some(u), Some(v)) = (p.get(name, Field::U), p.get(name, Field::V)) {
            let dt = lin.dtype;
            let (out_dim, inn) = lin.shape();
            let r = u.len() / out_dim.max(1);
            let f = |x: &[f32], rows, cols| -> Result<Factor> {
                Ok(Factor {
                    values: ndarray::Array2::from_shape_vec(
                        (rows, cols),
                        x.iter().map(|v| crate::quant::round_to(dt, *v)).collect(),
                    )?,
                    quant: None,
                })
            };
            lin.set_factored(f(u, out_dim, r)?, f(v, r, inn)?)?;
        }
    }
    Ok(out)
}

impl Pass for Kd {
    fn name(&self) -> String {
        "kd".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            teacher: true,
            inputs: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let t0 = Instant::now();
        let l = ctx.index();
        let (_, teacher_out) = ctx.teacher()?;
        let teacher_out: Vec<Act> = teacher_out.to_vec();
        let rope = ctx.rope()?;
        let inputs = ctx.inputs();
        // every calibration window as (batch, sample)
        let windows: Vec<(usize, usize)> = inputs
            .iter()
            .enumerate()
            .flat_map(|(bi, a)| (0..a.b).map(move |s| (bi, s)))
            .collect();
        if windows.is_empty() {
            bail!("kd: no calibration windows to distill on");
        }
        let before = rel_error(ctx, &ctx.layer, &teacher_out)?;
        let mut p = Params::of(&ctx.layer, &self.spec.params);
        let mut notes = BTreeMap::new();
        notes.insert("rel_error_before".into(), json!(before));
        notes.insert("tuned_values".into(), json!(p.len()));
        if p.is_empty() {
            notes.insert("kept".into(), json!("original (nothing to tune)"));
            ctx.records.push(
                LinearRecord::new(l, "block", "kd", t0)
                    .error(before)
                    .notes(notes),
            );
            return Ok(());
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.spec.seed ^ (l as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut adam = Adam::new(&p, self.spec.lr);
        let take = self.spec.batch.min(windows.len());
        let (mut first, mut last) = (f64::NAN, f64::NAN);
        for step in 0..self.spec.steps {
            let mut pick = rand::seq::index::sample(&mut rng, windows.len(), take).into_vec();
            pick.sort_unstable();
            let xs: Vec<Act> = pick
                .iter()
                .map(|&w| window(&inputs[windows[w].0], windows[w].1))
                .collect();
            let ys: Vec<Act> = pick
                .iter()
                .map(|&w| window(&teacher_out[windows[w].0], windows[w].1))
                .collect();
            let (loss, g) = loss_and_grad(&ctx.layer, ctx.config, rope, &p, &xs, &ys)?;
            if !loss.is_finite() {
                bail!("kd: layer {l}: the distillation loss is not finite at step {step}");
            }
            if step == 0 {
                first = loss;
            }
            last = loss;
            adam.update(&mut p, &g);
        }
        let candidate = with_params(&ctx.layer, &p)?;
        let after = rel_error(ctx, &candidate, &teacher_out)?;
        notes.insert("rel_error_after".into(), json!(after));
        notes.insert("steps".into(), json!(self.spec.steps));
        notes.insert("batch".into(), json!(take));
        notes.insert("lr".into(), json!(self.spec.lr));
        notes.insert("first_step_loss".into(), json!(first));
        notes.insert("last_step_loss".into(), json!(last));
        let groups: Vec<Group> = {
            let mut g: Vec<Group> = p.list.iter().map(|q| q.field.group()).collect();
            g.sort();
            g.dedup();
            g
        };
        notes.insert("groups".into(), json!(groups));
        let kept = if after < before {
            ctx.layer = candidate;
            "distilled"
        } else {
            ctx.warn(format!(
                "kd: layer {l}: distillation did not lower the block output error ({before:.4e} → {after:.4e}); kept the original parameters"
            ));
            "original (distillation did not help)"
        };
        notes.insert("kept".into(), json!(kept));
        ctx.records.push(
            LinearRecord::new(l, "block", "kd", t0)
                .error(after.min(before))
                .loss(last)
                .notes(notes),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backward::tests::{random_act, random_block, rnd, tiny_config};
    use crate::model::llama::Rope;

    /// On a fixed batch, Adam on eq. (1) drives the loss down: the target is the same block
    /// with every tunable tensor perturbed by up to ±20%, so a low loss is reachable.
    #[test]
    fn loss_goes_down_on_a_fixed_batch() {
        for ty in ["llama", "qwen2", "qwen3"] {
            let cfg = tiny_config(ty);
            let layer = random_block(&cfg, 3);
            let rope = Rope::new(&cfg, 16).unwrap();
            let xs = vec![random_act(&cfg, 1, 9, 4), random_act(&cfg, 1, 9, 5)];
            let p0 = Params::of(&layer, &d_params());
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
            let mut target_p = p0.clone();
            for q in target_p.list.iter_mut() {
                let f = rnd(q.values.len(), 0.2, &mut rng);
                q.values.iter_mut().zip(f).for_each(|(v, f)| *v *= 1.0 + f);
            }
            let tb = Block::new(&layer, &cfg, &target_p).unwrap();
            let ys: Vec<Act> = xs
                .iter()
                .map(|x| Act {
                    data: tb.forward(x, &rope).unwrap().0,
                    b: 1,
                    t: x.t,
                })
                .collect();
            let mut p = p0.clone();
            let mut adam = Adam::new(&p, 1e-2);
            let mut losses = Vec::new();
            for _ in 0..60 {
                let (l, g) = loss_and_grad(&layer, &cfg, &rope, &p, &xs, &ys).unwrap();
                losses.push(l);
                adam.update(&mut p, &g);
            }
            let (a, b) = (losses[0], *losses.last().unwrap());
            assert!(a > 0.0 && b < 0.3 * a, "{ty}: loss {a:.4e} → {b:.4e}");
        }
    }

    #[test]
    fn spec_refuses_bad_fields() {
        let ok: KdSpec = serde_yaml::from_str(
            "{lr: 0.001, steps: 3, batch: 2, seed: 1, params: [norms, scales]}",
        )
        .unwrap();
        assert!(ok.validate().is_ok());
        let e = serde_yaml::from_str::<KdSpec>("{lr: 0.001, stpes: 3}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("stpes"), "{e}");
        let e = serde_yaml::from_str::<KdSpec>("{params: [weights]}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("weights"), "{e}");
        for bad in ["{lr: 0}", "{steps: 0}", "{batch: 0}", "{params: []}"] {
            let s: KdSpec = serde_yaml::from_str(bad).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
    }
}
