//! SVD-LLM — Wang, Zheng, Wan, Zhang, "SVD-LLM: Truncation-aware Singular Value Decomposition
//! for Large Language Model Compression" (ICLR 2025), §3.1 and Algorithm 1 (truncation-aware
//! data whitening).
//!
//! Plain SVD truncates the singular values of W, but a small singular value of W is not a small
//! loss: what matters is the output, L = ‖WX − W′X‖_F (eq. 1). SVD-LLM whitens the input first.
//! With S the Cholesky factor of the input's Gram matrix, S Sᵀ = XᵀX (the paper writes X with
//! tokens as columns, XXᵀ = SSᵀ; here X is [tokens, in] and the engine's statistic is
//! H = 2/n·XᵀX, which scales S by a constant and changes nothing below):
//!
//!   W S = U Σ Vᵀ                                   (SVD of the whitened weight)
//!   W′  = U_r Σ_r V_rᵀ S⁻¹                         (truncate, then un-whiten)
//!   ‖(W − W′) S‖_F² = Σ_{i>r} σ_i²                 (Theorem 3.2: each dropped σ_i costs σ_i²
//!                                                   of output error, and nothing else does)
//!
//! because ‖A X ᵀ‖_F² = tr(A XᵀX Aᵀ) = ‖A S‖_F² and (W − W′) S = Σ_{i>r} σ_i u_i v_iᵀ. So the
//! truncation is the optimal rank-r output approximation on the calibration data, which plain
//! SVD is not. The factors are stored as in §3.1:
//!
//!   W_u = U_r Σ_r^{1/2}  [out, r],   W_v = Σ_r^{1/2} V_rᵀ S⁻¹  [r, in]
//!
//! (S⁻¹ applied as a triangular solve, never formed). The rank comes from the same `ratio` /
//! `rank` fields as `svd`. When H is not positive definite (dead inputs, fewer tokens than
//! channels), H is dampened with GPTQ's policy — H + λI, λ = damp · mean(diag H), damp ×10 until
//! Cholesky succeeds — and the value used is recorded as a warning. The paper's second stage
//! (§3.2, LoRA fine-tuning of W_u and W_v after truncation) is training and is not done here.
//!
//! **Heterogeneous ranks** (`allocation: by_loss`, after SVD-LLM V2, Wang et al. 2025, which
//! gives each weight matrix a compression ratio from its theoretical truncation loss instead of
//! one ratio for all). Since the loss of dropping σ_i is σ_i² (Theorem 3.2), the spectra of the
//! whitened weights price every possible rank before anything is cut, and one parameter budget
//! is spent where it removes the most loss per parameter ([`allocate_by_loss`]). Which budget:
//! the engine streams the model layer by layer, so when layer 0 is cut layer 5 has not been seen
//! (its inputs depend on how layer 0 was cut). A model-wide allocation would need a statistics
//! pass over all layers first (a second full calibration forward, on the dense model's
//! activations, which the cut model does not produce). We choose the per-layer budget: each
//! layer keeps exactly the parameters `uniform` would keep for it (Σ r_uniform·(m + n) over its
//! targeted linears), redistributed across its linears (q/k/v/o/gate/up/down) by marginal
//! whitened loss per parameter. The global budget is then met by construction (same bytes as
//! `uniform`, layer by layer), the decision uses only statistics the stream has, and the
//! losses compared are in comparable units (each is the squared output error of a linear on
//! this layer's calibration inputs). What it cannot do is move parameters between layers.

use super::harness::targeted;
use super::svd::{params_removed, rank_notes, split_sqrt, LowRank, SvdSpec};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use anyhow::{bail, Context, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvdLlmSpec {
    /// `ratio` or `rank`, `targets`, `ignore` as for `svd`.
    #[serde(flatten)]
    pub rank: SvdSpec,
    /// λ = damp · mean(diag H) when H is not positive definite, stepped up ×10 (and recorded)
    /// until Cholesky succeeds.
    #[serde(default = "d_damp")]
    pub damp: f64,
    /// `uniform` (default) or `by_loss` (see [`allocate_by_loss`]).
    #[serde(default)]
    pub allocation: Allocation,
}

fn d_damp() -> f64 {
    0.01
}

impl SvdLlmSpec {
    pub fn validate(&self) -> Result<()> {
        self.rank.validate()?;
        if !(self.damp > 0.0 && self.damp < 1.0) {
            bail!("field `damp` must be in (0, 1), found {}", self.damp);
        }
        Ok(())
    }
}

/// The whitening matrix: the lower Cholesky factor S of H (S Sᵀ = H), or of H + λI with
/// λ = damp · mean(diag H) when H is not positive definite, damp growing ×10 up to 1. Returns
/// S and the dampening fraction used (0 when H itself was factored).
pub fn whitening(h: &Array2<f64>, damp: f64) -> Result<(Array2<f64>, f64)> {
    if let Ok(s) = crate::linalg::cholesky_lower(h) {
        return Ok((s, 0.0));
    }
    let n = h.nrows();
    let mean_diag = (0..n).map(|j| h[[j, j]]).sum::<f64>() / n.max(1) as f64;
    if !(mean_diag > 0.0 && mean_diag.is_finite()) {
        bail!("input statistic has mean diagonal {mean_diag}: no calibration signal to whiten");
    }
    let mut used = damp;
    loop {
        let mut hd = h.clone();
        for j in 0..n {
            hd[[j, j]] += used * mean_diag;
        }
        match crate::linalg::cholesky_lower(&hd) {
            Ok(s) => return Ok((s, used)),
            Err(e) if used >= 1.0 => {
                bail!("H is not positive definite even with damp {used}: {e}")
            }
            Err(_) => used = (used * 10.0).min(1.0),
        }
    }
}

/// What SVD-LLM made of one weight matrix.
pub struct SvdLlmResult {
    /// W_u [out, r], W_v [r, in]; `sigma` is the spectrum of W·S, `loss` = Σ_{i>r} σ_i².
    pub factors: LowRank,
    /// The whitening matrix S (lower triangular, S Sᵀ = H + λI).
    pub s: Array2<f64>,
    /// The dampening fraction used (0: none needed).
    pub damp: f64,
}

/// The whitened decomposition of one weight before truncation: S and W·S = U Σ Vᵀ. Its
/// spectrum prices every rank (Theorem 3.2), which is what `allocation: by_loss` reads.
pub struct Whitened {
    pub s: Array2<f64>,
    pub svd: crate::linalg::Svd,
    /// Σ σ_i² of the singular values `svd` does not hold (0 when it holds the whole spectrum).
    pub rest: f64,
    pub damp: f64,
}

impl Whitened {
    /// Whiten `w` [out, in] with the input statistic `h` [in, in] and decompose W·S.
    pub fn new(w: &Array2<f32>, h: &Array2<f64>, damp: f64) -> Result<Self> {
        let (_, cols) = w.dim();
        if h.dim() != (cols, cols) {
            bail!("Hessian is {:?}, expected [{cols}, {cols}]", h.dim());
        }
        // S Sᵀ = H (dampened only if needed)
        let (s, damp) = whitening(h, damp)?;
        // W S = U Σ Vᵀ
        let ws = crate::linalg::matmul(&w.mapv(|x| x as f64), &s);
        let svd = crate::linalg::svd_thin(&ws)?;
        Ok(Whitened {
            s,
            svd,
            rest: 0.0,
            damp,
        })
    }

    /// As [`Whitened::new`], but only the leading `r` triplets of W·S (randomized where r is
    /// small against the matrix, [`crate::linalg::svd_top`]): for a known rank (EoRA's
    /// adapters), not for `by_loss`, which prices every rank.
    pub fn top(w: &Array2<f32>, h: &Array2<f64>, damp: f64, r: usize) -> Result<Self> {
        let (rows, cols) = w.dim();
        if h.dim() != (cols, cols) {
            bail!("Hessian is {:?}, expected [{cols}, {cols}]", h.dim());
        }
        let (s, damp) = whitening(h, damp)?;
        let ws = crate::linalg::matmul(&w.mapv(|x| x as f64), &s);
        let (svd, rest) = crate::linalg::svd_top(&ws, r.min(rows.min(cols)))?;
        Ok(Whitened { s, svd, rest, damp })
    }

    /// ‖W S‖_F², the whitened output energy of W (Σ of every σ_i²).
    pub fn total(&self) -> f64 {
        self.svd.s.iter().map(|x| x * x).sum::<f64>() + self.rest
    }

    /// Truncate at rank r: W_u = U_r Σ_r^{1/2}, W_v = (Σ_r^{1/2} V_rᵀ) S⁻¹.
    pub fn truncate(&self, r: usize) -> Result<LowRank> {
        let (u, b) = split_sqrt(&self.svd, r)?;
        let v = crate::linalg::solve_right_lower(&b, &self.s)?;
        // Theorem 3.2: the whitened truncation loss is the dropped spectrum
        let loss = self.svd.s[r..].iter().map(|x| x * x).sum::<f64>() + self.rest;
        Ok(LowRank {
            u,
            v,
            sigma: self.svd.s.clone(),
            loss,
        })
    }
}

/// SVD-LLM on one weight `w` [out, in] with input statistic `h` [in, in], at rank `r`.
pub fn svd_llm(w: &Array2<f32>, h: &Array2<f64>, r: usize, damp: f64) -> Result<SvdLlmResult> {
    let wh = Whitened::new(w, h, damp)?;
    let factors = wh.truncate(r)?;
    Ok(SvdLlmResult {
        factors,
        s: wh.s,
        damp: wh.damp,
    })
}

/// One linear as the rank allocation sees it: its shape and its whitened spectrum.
pub struct AllocItem<'a> {
    pub m: usize,
    pub n: usize,
    pub sigma: &'a [f64],
}

/// The largest useful rank of an [m, n] linear: min(m, n), and no more than the dense matrix's
/// parameters (r·(m + n) ≤ m·n), at least 1.
fn max_rank(m: usize, n: usize) -> usize {
    (m * n / (m + n)).min(m.min(n)).max(1)
}

/// `allocation: by_loss` — distribute a budget of kept parameters over linears by their
/// truncation losses. Raising linear i from rank r to r + 1 costs m_i + n_i parameters and
/// removes σ_{i,r+1}² of whitened loss (Theorem 3.2), so the summed loss Σ_i Σ_{j>r_i} σ_{i,j}²
/// is minimised under Σ_i r_i (m_i + n_i) ≤ budget by handing out ranks greedily in order of
/// loss removed per parameter, σ²/(m + n). Each linear's gains σ_{i,1}² ≥ σ_{i,2}² ≥ … are
/// non-increasing, so the greedy order is optimal up to the last, partly affordable step (the
/// knapsack boundary; a rank that does not fit is skipped and cheaper linears go on). Every
/// linear keeps rank ≥ 1. Ties go to the earlier linear, so the result is deterministic.
pub fn allocate_by_loss(items: &[AllocItem], budget: usize) -> Result<Vec<usize>> {
    let floor: usize = items.iter().map(|it| it.m + it.n).sum();
    if budget < floor {
        bail!("a budget of {budget} parameters cannot keep rank 1 in every linear ({floor})");
    }
    let mut ranks = vec![1usize; items.len()];
    let mut left = budget - floor;
    loop {
        let mut best: Option<(usize, f64)> = None;
        for (i, it) in items.iter().enumerate() {
            let r = ranks[i];
            let cost = it.m + it.n;
            if r >= max_rank(it.m, it.n) || r >= it.sigma.len() || cost > left {
                continue;
            }
            let gain = it.sigma[r] * it.sigma[r] / cost as f64;
            if best.is_none_or(|(_, g)| gain > g) {
                best = Some((i, gain));
            }
        }
        let Some((i, _)) = best else { break };
        ranks[i] += 1;
        left -= items[i].m + items[i].n;
    }
    Ok(ranks)
}

/// How the ranks of a layer's linears are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Allocation {
    /// Every linear at the rank `ratio` (or `rank`) gives it.
    #[default]
    Uniform,
    /// The same number of kept parameters per layer as `uniform`, redistributed across the
    /// layer's linears by [`allocate_by_loss`].
    ByLoss,
}

pub struct SvdLlm {
    spec: SvdLlmSpec,
    select: super::select::Selector,
}

impl SvdLlm {
    pub fn new(spec: &SvdLlmSpec) -> Result<Self> {
        spec.validate()?;
        Ok(SvdLlm {
            spec: spec.clone(),
            select: super::select::Selector::new(&spec.rank.targets, &spec.rank.ignore)?,
        })
    }
}

impl Pass for SvdLlm {
    fn name(&self) -> String {
        "svd_llm".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            hessian: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        // every linear whitened with the layer's inputs before any is factored (one
        // statistics forward), as the paper profiles the uncompressed layer
        ctx.refresh()?;
        let t = Instant::now();
        let names = targeted(ctx, &self.select);
        let mut dec = Vec::new();
        for name in &names {
            let module = ctx.module_name(name);
            let h = super::hessian_or_identity(
                ctx,
                name,
                "factored by a plain SVD (identity Hessian)",
            )?;
            let lin = &ctx.layer.linears[*name];
            let (m, n) = lin.shape();
            let r = self
                .spec
                .rank
                .rank_for(m, n)
                .with_context(|| module.clone())?;
            let wh =
                Whitened::new(lin.weight(), &h, self.spec.damp).with_context(|| module.clone())?;
            dec.push((m, n, r, h, wh));
        }
        // the ranks: uniform, or the layer's uniform parameter budget allocated by loss
        let ranks: Vec<usize> = match self.spec.allocation {
            Allocation::Uniform => dec.iter().map(|d| d.2).collect(),
            Allocation::ByLoss => {
                let budget = dec.iter().map(|d| d.2 * (d.0 + d.1)).sum();
                let items: Vec<AllocItem> = dec
                    .iter()
                    .map(|d| AllocItem {
                        m: d.0,
                        n: d.1,
                        sigma: &d.4.svd.s,
                    })
                    .collect();
                allocate_by_loss(&items, budget)
                    .with_context(|| format!("layer {}", ctx.index()))?
            }
        };
        // the shared work (statistics, whitening, SVD) is split evenly over the linears
        let shared = t.elapsed().as_secs_f64() / names.len().max(1) as f64;
        for (name, ((m, n, _, h, wh), r)) in names.iter().zip(dec.into_iter().zip(ranks)) {
            let t = Instant::now();
            let module = ctx.module_name(name);
            if wh.damp > 0.0 {
                ctx.warn(format!(
                    "{module}: input statistic not positive definite, whitened with damp {}",
                    wh.damp
                ));
            }
            let lr = wh.truncate(r).with_context(|| module.clone())?;
            let lin = ctx.layer.linears.get_mut(*name).context("linear present")?;
            let before = lin.weight().clone();
            let (u, v) = lr.factors(lin.dtype);
            lin.set_factored(u, v).with_context(|| module.clone())?;
            let rel = crate::linalg::rel_output_error(&before, lin.weight(), &h);
            let mut notes = rank_notes(m, n, r);
            notes.insert("damp".into(), json!(wh.damp));
            if self.spec.allocation == Allocation::ByLoss {
                notes.insert("allocation".into(), json!("by_loss"));
            }
            ctx.records.push(
                LinearRecord::new(ctx.index(), name, "svd_llm", t)
                    .error(rel)
                    .loss(lr.loss)
                    .seconds(shared + t.elapsed().as_secs_f64())
                    .notes(notes),
            );
            if params_removed(m, n, r) <= 0 {
                ctx.warn(format!(
                    "{module}: rank {r} factors hold {} parameters, not fewer than the {m}×{n} matrix",
                    r * (m + n)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::svd::svd_truncate;
    use super::*;
    fn problem(rows: usize, cols: usize, n: usize, seed: u64) -> (Array2<f32>, Array2<f64>) {
        crate::testing::correlated_problem(rows, cols, n, seed, true)
    }

    fn product32(lr: &LowRank) -> Array2<f32> {
        lr.u.dot(&lr.v).mapv(|x| x as f32)
    }

    #[test]
    fn whitened_truncation_loss_is_the_dropped_spectrum() {
        let (w, h) = problem(48, 64, 512, 1);
        for r in [1, 8, 24, 47] {
            let res = svd_llm(&w, &h, r, 0.01).unwrap();
            assert_eq!(res.damp, 0.0, "H is positive definite with 512 tokens");
            let lr = &res.factors;
            assert_eq!((lr.u.dim(), lr.v.dim()), ((48, r), (r, 64)));
            // ‖(W − W_u W_v) S‖_F² against Σ_{i>r} σ_i²
            let delta = w.mapv(|x| x as f64) - lr.u.dot(&lr.v);
            let whitened: f64 = delta.dot(&res.s).iter().map(|x| x * x).sum();
            let dropped: f64 = lr.sigma[r..].iter().map(|s| s * s).sum();
            assert!(
                (whitened - dropped).abs() <= 1e-9 * dropped,
                "rank {r}: ‖ΔW·S‖² = {whitened}, dropped σ² = {dropped}"
            );
            assert_eq!(lr.loss, dropped);
            // and it is the output error: tr(ΔW H ΔWᵀ) = ‖ΔW S‖² (S Sᵀ = H)
            let out = crate::linalg::quad_trace(&delta.mapv(|x| x as f32), &h);
            assert!(
                (out - whitened).abs() <= 1e-4 * whitened,
                "{out} vs {whitened}"
            );
        }
    }

    #[test]
    fn beats_plain_svd_on_correlated_inputs() {
        let (w, h) = problem(48, 64, 512, 2);
        for r in [4, 16, 32] {
            let llm = svd_llm(&w, &h, r, 0.01).unwrap();
            let plain = svd_truncate(&w, r).unwrap();
            let e_llm = crate::linalg::rel_output_error(&w, &product32(&llm.factors), &h);
            let e_svd = crate::linalg::rel_output_error(&w, &product32(&plain), &h);
            assert!(
                e_llm < e_svd,
                "rank {r}: SVD-LLM output error {e_llm} not below plain SVD's {e_svd}"
            );
        }
    }

    #[test]
    fn full_rank_factors_multiply_back() {
        for (rows, cols) in [(32, 48), (48, 32)] {
            let (w, h) = problem(rows, cols, 256, 3);
            let res = svd_llm(&w, &h, rows.min(cols), 0.01).unwrap();
            let back = res.factors.u.dot(&res.factors.v);
            let e = (&back - &w.mapv(|x| x as f64))
                .iter()
                .fold(0f64, |m, v| m.max(v.abs()));
            assert!(
                e < 1e-8,
                "{rows}×{cols}: full-rank factors differ from W by {e}"
            );
        }
    }

    #[test]
    fn rank_deficient_inputs_are_dampened_and_recorded() {
        // 16 tokens for 32 channels: XᵀX has rank 16, and one input is dead
        let (w, mut h) = problem(8, 32, 16, 4);
        for k in 0..32 {
            h[[5, k]] = 0.0;
            h[[k, 5]] = 0.0;
        }
        let res = svd_llm(&w, &h, 4, 0.01).unwrap();
        assert!(res.damp >= 0.01, "damp {}", res.damp);
        assert!(res
            .factors
            .u
            .iter()
            .chain(res.factors.v.iter())
            .all(|x| x.is_finite()));
        // zero statistic: nothing to whiten with
        assert!(svd_llm(&w, &Array2::zeros((32, 32)), 4, 0.01).is_err());
    }

    #[test]
    fn by_loss_meets_the_budget_and_beats_uniform() {
        // four linears of a "layer": different shapes, weight scales and input correlations
        let shapes = [(48, 64, 1.0), (16, 64, 0.3), (64, 32, 2.0), (32, 96, 0.7)];
        let mut dec = Vec::new();
        for (i, (m, n, scale)) in shapes.iter().enumerate() {
            let (w, h) = problem(*m, *n, 384, 10 + i as u64);
            let w = w.mapv(|x| x * *scale as f32);
            dec.push((*m, *n, Whitened::new(&w, &h, 0.01).unwrap()));
        }
        for ratio in [0.2, 0.4, 0.6] {
            let uniform: Vec<usize> = dec
                .iter()
                .map(|(m, n, _)| super::super::svd::rank_for_ratio(*m, *n, ratio))
                .collect();
            let budget: usize = dec
                .iter()
                .zip(&uniform)
                .map(|((m, n, _), r)| r * (m + n))
                .sum();
            let items: Vec<AllocItem> = dec
                .iter()
                .map(|(m, n, wh)| AllocItem {
                    m: *m,
                    n: *n,
                    sigma: &wh.svd.s,
                })
                .collect();
            let ranks = allocate_by_loss(&items, budget).unwrap();
            let spent: usize = dec
                .iter()
                .zip(&ranks)
                .map(|((m, n, _), r)| r * (m + n))
                .sum();
            let widest = dec.iter().map(|(m, n, _)| m + n).max().unwrap();
            assert!(
                spent <= budget && budget - spent < widest,
                "ratio {ratio}: spent {spent} of {budget}"
            );
            // the summed whitened loss, measured on the factors (not read off the spectrum)
            let loss = |rs: &[usize]| -> f64 {
                dec.iter()
                    .zip(rs)
                    .map(|((_, _, wh), r)| {
                        let lr = wh.truncate(*r).unwrap();
                        let w = wh
                            .svd
                            .u
                            .dot(&Array2::from_diag(&ndarray::Array1::from(wh.svd.s.clone())));
                        let ws = w.dot(&wh.svd.v.t());
                        let approx = lr.u.dot(&lr.v).dot(&wh.s);
                        (&ws - &approx).iter().map(|x| x * x).sum::<f64>()
                    })
                    .sum()
            };
            let (l_alloc, l_uni) = (loss(&ranks), loss(&uniform));
            assert!(
                l_alloc < l_uni,
                "ratio {ratio}: by_loss {l_alloc} (ranks {ranks:?}) not below uniform {l_uni} ({uniform:?})"
            );
            assert_ne!(ranks, uniform);
        }
        // too small a budget for rank 1 everywhere is refused
        let items = [AllocItem {
            m: 4,
            n: 4,
            sigma: &[1.0, 0.5],
        }];
        assert!(allocate_by_loss(&items, 7).is_err());
        assert_eq!(allocate_by_loss(&items, 8).unwrap(), vec![1]);
        // never beyond the dense matrix's parameters: 4×4 caps at rank 2 (16 = 2·8)
        let items = [AllocItem {
            m: 4,
            n: 4,
            sigma: &[1.0, 0.5, 0.2, 0.1],
        }];
        assert_eq!(allocate_by_loss(&items, 1000).unwrap(), vec![2]);
    }

    /// One `passes:` entry as the pipeline reads it.
    fn entry(yaml: &str) -> Result<super::super::PassSpec> {
        let text = format!("- {yaml}");
        let de = serde_yaml::Deserializer::from_str(&text);
        let mut v: Vec<super::super::PassSpec> =
            serde_yaml::with::singleton_map_recursive::deserialize(de)?;
        let s = v.pop().context("one entry")?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn yaml_fields() {
        let spec = entry("svd_llm: {ratio: 0.2, targets: [\"re:.*_proj$\"]}").unwrap();
        assert_eq!(spec.name(), "svd_llm");
        assert!(spec.needs_calibration());
        let by = entry("svd_llm: {ratio: 0.4, allocation: by_loss}").unwrap();
        assert!(matches!(
            by,
            super::super::PassSpec::SvdLlm(SvdLlmSpec {
                allocation: Allocation::ByLoss,
                ..
            })
        ));
        let svd = entry("svd: {rank: 8}").unwrap();
        assert!(!svd.needs_calibration());
        for bad in [
            "svd_llm: {ratio: 0.2, rnak: 3}",
            "svd_llm: {ratio: 0.2, rank: 3}",
            "svd_llm: {}",
            "svd: {ratio: 1.5}",
            "svd: {ratio: 0.2, damp: 0.1}",
            "svdllm: {ratio: 0.2}",
            "svd_llm: {ratio: 0.2, allocation: greedy}",
        ] {
            assert!(entry(bad).is_err(), "accepted `{bad}`");
        }
    }
}
