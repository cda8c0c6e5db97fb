//! EoRA — Liu, Chen, Li, et al., "EoRA: Fine-tuning-free Compensation for Compressed LLM with
//! Eigenspace Low-Rank Approximation" (2024), §3: compensate the error a compression pass left
//! in each linear with a low-rank adapter, fitted in the space of the layer's inputs rather than
//! in weight space.
//!
//! After the pass before this one turned W into Ŵ (quantized codes, a mask, …), the error is
//! ΔW = W − Ŵ (eq. 2). What matters is its output on the inputs X, ‖ΔW Xᵀ‖_F, not ‖ΔW‖_F. EoRA
//! projects ΔW into the eigenspace of XᵀX = Q Λ Qᵀ (eq. 4), ΔW′ = ΔW Q Λ^{1/2}, takes the best
//! rank-r approximation of ΔW′ by SVD (only its leading r triplets: randomized range finding
//! where r is small against the matrix, `linalg::svd_top`), and projects back with
//! (Q Λ^{1/2})⁻¹ (eq. 5–6). Any
//! S with S Sᵀ = XᵀX gives the same rank-r product (S = Q Λ^{1/2} R for an orthogonal R, and
//! the SVD of ΔW S R is that of ΔW S rotated), so we use the Cholesky factor that SVD-LLM
//! whitens with (`svd_llm::Whitened`, same dampening when XᵀX is not positive definite):
//!
//!   ΔW S = U Σ Vᵀ,   B = U_r Σ_r^{1/2} [out, r],   A = Σ_r^{1/2} V_rᵀ S⁻¹ [r, in],
//!   ‖(ΔW − B A) S‖_F² = Σ_{i>r} σ_i²   (the output error left after compensation)
//!
//! and the linear computes Ŵ + B·A: its forward runs the compressed weight plus the adapter
//! (so the calibration stream of later layers and `compress eval` see it), and the exporter
//! writes the adapter beside the checkpoint as a PEFT LoRA adapter (lora_A = A, lora_B = B,
//! scaling 1). B and A are rounded to the checkpoint's dtype, as stored.
//!
//! Which W: the weights as they were before the pass just before this one (`ctx.previous`, so
//! `awq` → `gptq` → `eora` compensates GPTQ's rounding of the AWQ-scaled weights). Which X: the
//! inputs of the compressed model at this layer, as the adapter will see them when served,
//! collected site by site in execution order (q/k/v, then o with the q/k/v adapters in place,
//! then gate/up, then down).

use super::harness::targeted;
use super::svd_llm::Whitened;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use crate::model::layer::Adapter;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EoraSpec {
    /// The adapter's rank r (capped at min(out, in)).
    pub rank: usize,
    #[serde(default = "super::default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "super::default_ignore")]
    pub ignore: Vec<String>,
    /// Dampening when XᵀX is not positive definite, as for `svd_llm`.
    #[serde(default = "d_damp")]
    pub damp: f64,
}

fn d_damp() -> f64 {
    0.01
}

impl EoraSpec {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("field `rank` must be at least 1");
        }
        if !(self.damp > 0.0 && self.damp < 1.0) {
            bail!("field `damp` must be in (0, 1), found {}", self.damp);
        }
        super::select::Selector::new(&self.targets, &self.ignore)?;
        Ok(())
    }
}

/// EoRA's adapter for one linear: B [out, r], A [r, in] with B·A ≈ W − Ŵ in the whitened
/// space of `h`, and the whitened error before and after, ‖ΔW S‖² and Σ_{i>r} σ_i².
pub struct Compensation {
    pub adapter: Adapter,
    pub loss_before: f64,
    pub loss_after: f64,
    pub damp: f64,
}

/// Fit the adapter: W (before the compression), Ŵ (after), input statistic H, rank r.
pub fn compensate(
    w: &ndarray::Array2<f32>,
    w_hat: &ndarray::Array2<f32>,
    h: &ndarray::Array2<f64>,
    r: usize,
    damp: f64,
) -> Result<Compensation> {
    if w.dim() != w_hat.dim() {
        bail!("W is {:?}, Ŵ {:?}", w.dim(), w_hat.dim());
    }
    // ΔW = W − Ŵ (eq. 2), whitened and decomposed: ΔW S = U Σ Vᵀ
    let delta = w - w_hat;
    let wh = Whitened::top(&delta, h, damp, r)?;
    let lr = wh.truncate(wh.svd.s.len())?;
    Ok(Compensation {
        adapter: Adapter {
            a: lr.v.mapv(|x| x as f32),
            b: lr.u.mapv(|x| x as f32),
        },
        loss_before: wh.total(),
        loss_after: lr.loss,
        damp: wh.damp,
    })
}

pub struct Eora {
    spec: EoraSpec,
    select: super::select::Selector,
}

impl Eora {
    pub fn new(spec: &EoraSpec) -> Result<Self> {
        spec.validate()?;
        Ok(Eora {
            spec: spec.clone(),
            select: super::select::Selector::new(&spec.targets, &spec.ignore)?,
        })
    }
}

impl Pass for Eora {
    fn name(&self) -> String {
        "eora".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            hessian: true,
            previous: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let names = targeted(ctx, &self.select);
        let before: BTreeMap<&str, ndarray::Array2<f32>> = {
            let prev = ctx.previous()?;
            names
                .iter()
                .map(|n| {
                    Ok((
                        *n,
                        prev.linears
                            .get(*n)
                            .context("linear present")?
                            .weight()
                            .clone(),
                    ))
                })
                .collect::<Result<_>>()?
        };
        // site by site in execution order, so each site's inputs carry the adapters upstream
        let block = ctx.config.block();
        for site in block.sites.iter().map(|s| s.site) {
            let here: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| block.site_of(n) == Some(site))
                .collect();
            if here.is_empty() {
                continue;
            }
            let h = ctx.stats(site)?.hessian().context("no Hessian collected")?;
            for name in here {
                let t = Instant::now();
                let module = ctx.module_name(name);
                let w = &before[name];
                let lin = ctx.layer.linears.get_mut(name).context("linear present")?;
                if lin.weight() == w {
                    ctx.warn(format!(
                        "{module}: unchanged by the pass before eora, no adapter"
                    ));
                    continue;
                }
                let c = compensate(w, lin.weight(), &h, self.spec.rank, self.spec.damp)
                    .with_context(|| module.clone())?;
                let rel_before = crate::linalg::rel_output_error(w, lin.weight(), &h);
                // stored in the checkpoint's dtype, as the adapter file holds it
                let dt = lin.dtype;
                let round = |m: &ndarray::Array2<f32>| m.mapv(|x| crate::quant::round_to(dt, x));
                let adapter = Adapter {
                    a: round(&c.adapter.a),
                    b: round(&c.adapter.b),
                };
                let r = adapter.rank();
                lin.set_adapter(adapter).with_context(|| module.clone())?;
                let rel = crate::linalg::rel_output_error(w, lin.weight(), &h);
                let (m, n) = lin.shape();
                let mut notes = BTreeMap::new();
                notes.insert("rank".into(), json!(r));
                notes.insert("adapter_params".into(), json!(r * (m + n)));
                notes.insert("rel_output_error_before".into(), json!(rel_before));
                notes.insert("loss_before".into(), json!(c.loss_before));
                notes.insert("damp".into(), json!(c.damp));
                if c.damp > 0.0 {
                    ctx.warn(format!(
                        "{module}: input statistic not positive definite, whitened with damp {}",
                        c.damp
                    ));
                }
                ctx.records.push(
                    LinearRecord::new(ctx.index(), name, "eora", t)
                        .error(rel)
                        .loss(c.loss_after)
                        .notes(notes),
                );
            }
            ctx.invalidate();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn problem(rows: usize, cols: usize, n: usize, seed: u64) -> (Array2<f32>, Array2<f64>) {
        crate::testing::correlated_problem(rows, cols, n, seed, true)
    }

    /// RTN W3 of `w`, group 16, as the quantized weight to compensate.
    fn quantized(w: &Array2<f32>) -> Array2<f32> {
        let args = crate::quant::QuantArgs::int(
            3,
            true,
            crate::quant::Strategy::Group,
            16,
            crate::quant::Observer::MinMax,
        );
        crate::quant::quantize_rtn(w.view(), &args, crate::model::DType::F32)
            .unwrap()
            .dequantize()
    }

    #[test]
    fn adapter_leaves_the_dropped_spectrum_and_beats_weight_space_svd() {
        let (w, h) = problem(40, 64, 512, 21);
        let wq = quantized(&w);
        let err0 = crate::linalg::quad_trace(&(&w - &wq), &h);
        let mut last = err0;
        for r in [4, 8, 16, 32] {
            let c = compensate(&w, &wq, &h, r, 0.01).unwrap();
            let ad = &c.adapter;
            assert_eq!((ad.a.dim(), ad.b.dim()), ((r, 64), (40, r)));
            let merged = &wq + &ad.b.dot(&ad.a);
            // output error of Ŵ + B·A = the whitened loss left, Σ_{i>r} σ_i²
            let err = crate::linalg::quad_trace(&(&w - &merged), &h);
            assert!(
                (c.loss_before - err0).abs() <= 1e-3 * err0,
                "{} vs {err0}",
                c.loss_before
            );
            assert!(
                (err - c.loss_after).abs() <= 1e-3 * c.loss_after.max(1e-12),
                "{err} vs {}",
                c.loss_after
            );
            assert!(err < last, "rank {r}: {err} not below {last}");
            last = err;
            // a plain SVD of ΔW (weight space) at the same rank compensates less output error
            let d = crate::linalg::svd_thin(&(&w - &wq).mapv(|x| x as f64)).unwrap();
            let (u, v) = super::super::svd::split_sqrt(&d, r).unwrap();
            let plain = &wq + &u.dot(&v).mapv(|x| x as f32);
            let err_plain = crate::linalg::quad_trace(&(&w - &plain), &h);
            assert!(
                err < err_plain,
                "rank {r}: EoRA {err} vs weight-space SVD {err_plain}"
            );
        }
        // full rank recovers W
        let c = compensate(&w, &wq, &h, 64, 0.01).unwrap();
        let merged = &wq + &c.adapter.b.dot(&c.adapter.a);
        let e = (&merged - &w).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(e < 1e-3, "{e}");
    }
}
