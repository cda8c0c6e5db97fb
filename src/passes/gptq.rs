//! GPTQ — Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
//! Generative Pre-trained Transformers" (ICLR 2023), Algorithm 1.
//!
//! For a linear W [rows, cols] with input Hessian H = 2/n · XᵀX (eq. 1's second derivative):
//! 1. dead inputs (H_jj = 0): H_jj ← 1, W[:, j] ← 0;
//! 2. optional act-order: process columns by descending H_jj;
//! 3. dampening H ← H + λ I, λ = damp · mean(diag H); when Cholesky fails, damp grows ×10
//!    (recorded as a warning) instead of crashing;
//! 4. U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU; eq. 3 written with Cholesky rows);
//! 5. for each column j (in lazy blocks of B columns): q_j = quant(w_j);
//!    e_j = (w_j − q_j) / U_jj; w_{j+1:} ← w_{j+1:} − e_j · U_{j, j+1:}  (eq. 3 / Alg. 1);
//!    the updates of later blocks are applied once per block as one matrix product;
//! 6. group parameters are computed at each group boundary from the already-updated weights
//!    (or, with `static_groups`, once from the original weights).
//!
//! Every row's updates are independent of the other rows (U is shared), so rows run in
//! parallel with rayon; results do not depend on the thread count.

use super::Scheme;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use crate::model::layer::{Site, LINEARS};
use crate::model::DType;
use crate::quant::scale_dtype_for;
use crate::quant::{
    dequantize_value, group_params, quantize_value, round_to, Observer, QuantArgs, QuantizedLinear,
    Strategy,
};
use anyhow::{bail, Result};
use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptqSpec {
    #[serde(default = "d_bits")]
    pub bits: u32,
    #[serde(default = "d_strategy")]
    pub strategy: Strategy,
    #[serde(default = "d_group")]
    pub group_size: i64,
    #[serde(default = "d_true")]
    pub sym: bool,
    #[serde(default = "d_observer")]
    pub observer: Observer,
    #[serde(default = "d_targets")]
    pub targets: Vec<String>,
    #[serde(default = "d_ignore")]
    pub ignore: Vec<String>,
    /// λ = damp · mean(diag H).
    #[serde(default = "d_damp")]
    pub damp: f64,
    /// Columns per lazy-update block.
    #[serde(default = "d_block")]
    pub block_size: usize,
    /// Quantize columns in order of descending H_jj. Default by width, from measurements on a
    /// real checkpoint (SmolLM2-135M, BENCHMARKS.md): on for 4 bits and more (as
    /// llm-compressor's `actorder: static`; in column order GPTQ was worse than RTN at W4 g64,
    /// 43.82 vs 42.11, with static order 39.82), off below (at W3 g64 column order with group
    /// parameters from the updated weights gave 121.87 against 151.64 with static order: fixed
    /// groups clip the error-fed weights on a 3-bit grid).
    #[serde(default)]
    pub act_order: Option<bool>,
    /// With act_order: group parameters from the original weights, groups in column order
    /// (no g_idx needed by the serving engine, no act-order kernel). Default: on with
    /// act_order; `false` gives GPTQ's dynamic groups in activation order (g_idx written).
    #[serde(default)]
    pub static_groups: Option<bool>,
    /// q/k/v → o → gate/up → down, re-running the partial layer between (statistics of later
    /// linears see the quantized earlier ones). Off by default, as in the GPTQ reference and
    /// llm-compressor: every linear's Hessian comes from the layer's original inputs (one
    /// statistics forward per layer). Measured on ref-llama-9m, off was better at W3 g128
    /// (BENCHMARKS.md) and 1.4× faster.
    #[serde(default)]
    pub true_sequential: bool,
}

fn d_bits() -> u32 {
    4
}
fn d_strategy() -> Strategy {
    Strategy::Group
}
fn d_group() -> i64 {
    128
}
fn d_true() -> bool {
    true
}
fn d_observer() -> Observer {
    Observer::MinMax
}
fn d_targets() -> Vec<String> {
    vec!["Linear".into()]
}
fn d_ignore() -> Vec<String> {
    vec!["lm_head".into()]
}
fn d_damp() -> f64 {
    0.01
}
fn d_block() -> usize {
    128
}

impl GptqSpec {
    pub fn scheme(&self) -> Scheme {
        Scheme {
            bits: self.bits,
            strategy: self.strategy,
            group_size: self.group_size,
            sym: self.sym,
            observer: self.observer,
            targets: self.targets.clone(),
            ignore: self.ignore.clone(),
        }
    }

    /// Static groups: on by default whenever act_order is.
    pub fn static_groups(&self) -> bool {
        self.act_order() && self.static_groups.unwrap_or(true)
    }

    /// Activation order: as given, else on for 4 bits and more (see the field).
    pub fn act_order(&self) -> bool {
        self.act_order.unwrap_or(self.bits >= 4)
    }

    pub fn validate(&self) -> Result<()> {
        self.scheme().args()?.validate()?;
        if !(self.damp > 0.0 && self.damp < 1.0) {
            bail!("field `damp` must be in (0, 1), found {}", self.damp);
        }
        if self.block_size == 0 {
            bail!("field `block_size` must be at least 1");
        }
        if self.static_groups == Some(true) && !self.act_order() {
            bail!("field `static_groups` only applies with `act_order: true`");
        }
        Ok(())
    }
}

pub struct Gptq {
    spec: GptqSpec,
    args: QuantArgs,
    select: super::select::Selector,
}

impl Gptq {
    pub fn new(spec: &GptqSpec) -> Result<Self> {
        spec.validate()?;
        let s = spec.scheme();
        Ok(Gptq {
            spec: spec.clone(),
            args: s.args()?,
            select: s.selector()?,
        })
    }
}

/// What quantizing one matrix produced.
pub struct GptqResult {
    pub quant: QuantizedLinear,
    pub dequant: Array2<f32>,
    /// Σ ((w − q) / U_jj)² over all weights.
    pub loss: f64,
    /// The dampening fraction finally used.
    pub damp: f64,
}

/// GPTQ on one weight matrix `w` [rows, cols] with Hessian `h` [cols, cols].
pub fn gptq_quantize(
    w: &Array2<f32>,
    h: &Array2<f64>,
    args: &QuantArgs,
    scale_dtype: DType,
    damp: f64,
    block_size: usize,
    act_order: bool,
    static_groups: bool,
) -> Result<GptqResult> {
    let (rows, cols) = w.dim();
    if h.dim() != (cols, cols) {
        bail!("Hessian is {:?}, expected [{cols}, {cols}]", h.dim());
    }
    let gs = match args.strategy {
        Strategy::Group => {
            if cols % args.group_size != 0 {
                bail!(
                    "in_features {cols} is not a multiple of group_size {}",
                    args.group_size
                );
            }
            args.group_size
        }
        _ => cols,
    };
    let mut w = w.clone();
    let mut h = h.clone();
    // 1. dead inputs
    for j in 0..cols {
        if h[[j, j]] == 0.0 {
            h[[j, j]] = 1.0;
            w.column_mut(j).fill(0.0);
        }
    }
    // Per-row parameters that do not follow the updates: channel/tensor strategies (from the
    // original W, as the reference does) and static groups.
    let n_groups = cols / gs;
    let fixed: Option<(Vec<f32>, Vec<i32>)> = match args.strategy {
        Strategy::Tensor => {
            let all: Vec<f32> = w.iter().copied().collect();
            let (s, z) = group_params(&all, args, scale_dtype);
            Some((vec![s; rows], vec![z; rows]))
        }
        Strategy::Channel => {
            let mut s = vec![0f32; rows];
            let mut z = vec![0i32; rows];
            for r in 0..rows {
                let row: Vec<f32> = w.row(r).to_vec();
                let (a, b) = group_params(&row, args, scale_dtype);
                s[r] = a;
                z[r] = b;
            }
            Some((s, z))
        }
        Strategy::Group if static_groups => {
            let mut s = vec![0f32; rows * n_groups];
            let mut z = vec![0i32; rows * n_groups];
            for r in 0..rows {
                for g in 0..n_groups {
                    let v: Vec<f32> = (g * gs..(g + 1) * gs).map(|j| w[[r, j]]).collect();
                    let (a, b) = group_params(&v, args, scale_dtype);
                    s[r * n_groups + g] = a;
                    z[r * n_groups + g] = b;
                }
            }
            Some((s, z))
        }
        Strategy::Group => None,
    };
    // 2. act-order permutation
    let perm: Vec<usize> = if act_order {
        let mut p: Vec<usize> = (0..cols).collect();
        // descending diag(H); stable sort keeps ties in column order (deterministic)
        p.sort_by(|&a, &b| {
            h[[b, b]]
                .partial_cmp(&h[[a, a]])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        p
    } else {
        (0..cols).collect()
    };
    let wp = Array2::from_shape_fn((rows, cols), |(r, j)| w[[r, perm[j]]]);
    let hp = Array2::from_shape_fn((cols, cols), |(i, j)| h[[perm[i], perm[j]]]);
    // 3.–4. dampening and the Cholesky factor of H⁻¹
    let mean_diag = (0..cols).map(|j| hp[[j, j]]).sum::<f64>() / cols as f64;
    let mut used_damp = damp;
    let u = loop {
        let mut hd = hp.clone();
        let lambda = used_damp * mean_diag;
        for j in 0..cols {
            hd[[j, j]] += lambda;
        }
        match crate::linalg::inverse_upper_cholesky(&hd) {
            Ok(u) => break u,
            Err(e) => {
                if used_damp >= 1.0 {
                    bail!("H is not positive definite even with damp {used_damp}: {e}");
                }
                used_damp = (used_damp * 10.0).min(1.0);
            }
        }
    };
    let u32m: Vec<f32> = u.iter().map(|&x| x as f32).collect(); // row-major [cols, cols]
                                                                // 5. column loop, rows in parallel.
    let mut wrows: Vec<f32> = wp.iter().copied().collect(); // row-major [rows, cols]
    let mut codes = vec![0i8; rows * cols];
    let mut scales = vec![0f32; rows * n_groups];
    let mut zeros = vec![0i32; rows * n_groups];
    let mut loss_rows = vec![0f64; rows];
    let fixed_ref = fixed.as_ref();
    wrows
        .par_chunks_mut(cols)
        .zip(codes.par_chunks_mut(cols))
        .zip(scales.par_chunks_mut(n_groups))
        .zip(zeros.par_chunks_mut(n_groups))
        .zip(loss_rows.par_iter_mut())
        .enumerate()
        .for_each(|(r, ((((wr, cr), sr), zr), lr))| {
            let mut err = vec![0f32; block_size];
            let mut cur: (f32, i32) = (1.0, 0);
            let mut loss = 0f64;
            let mut i1 = 0;
            while i1 < cols {
                let i2 = (i1 + block_size).min(cols);
                for i in i1..i2 {
                    // parameters for this column
                    match (args.strategy, fixed_ref) {
                        (Strategy::Group, Some((s, z))) => {
                            let g = perm[i] / gs;
                            cur = (s[r * n_groups + g], z[r * n_groups + g]);
                        }
                        (Strategy::Group, None) => {
                            if i % gs == 0 {
                                cur = group_params(&wr[i..i + gs], args, scale_dtype);
                                sr[i / gs] = cur.0;
                                zr[i / gs] = cur.1;
                            }
                        }
                        (_, Some((s, z))) => cur = (s[r], z[r]),
                        (_, None) => unreachable!("channel/tensor parameters are fixed"),
                    }
                    let x = wr[i];
                    // The working weights are f32 (updated by the error feedback), so w/scale
                    // is computed in f32 as llm-compressor's GPTQ does (GPTQ_PRECISION), even
                    // when the scales are bf16 values; only RTN on the stored weights rounds
                    // every op to the weight dtype, as compressed-tensors does on bf16 tensors.
                    let q = quantize_value(x, cur.0, cur.1, args, DType::F32);
                    // (q − z)·s as the reference computes it: in the scale's dtype (a bf16
                    // product for bf16 checkpoints), which is also what the stored weight
                    // dequantizes to; the error fed forward is measured against that.
                    let dq = round_to(scale_dtype, dequantize_value(q, cur.0, cur.1));
                    cr[i] = q as i8;
                    let d = u32m[i * cols + i];
                    let e = (x - dq) / d;
                    loss += (e as f64) * (e as f64);
                    // w_{i+1..i2} -= e · U[i, i+1..i2]   (within the block)
                    let urow = &u32m[i * cols..(i + 1) * cols];
                    for k in i + 1..i2 {
                        wr[k] -= e * urow[k];
                    }
                    err[i - i1] = e;
                }
                // lazy batch update of the later columns: w_{i2..} -= E · U[i1..i2, i2..]
                for (bi, e) in err[..i2 - i1].iter().enumerate() {
                    let urow = &u32m[(i1 + bi) * cols..(i1 + bi + 1) * cols];
                    for k in i2..cols {
                        wr[k] -= e * urow[k];
                    }
                }
                i1 = i2;
            }
            *lr = loss;
        });
    // Undo the permutation; record parameters.
    let mut out_codes = vec![0i8; rows * cols];
    for r in 0..rows {
        for j in 0..cols {
            out_codes[r * cols + perm[j]] = codes[r * cols + j];
        }
    }
    let (scales, zeros, g_idx) = match (args.strategy, fixed) {
        (Strategy::Group, Some((s, z))) => (s, z, None),
        (Strategy::Group, None) => {
            let g_idx = if act_order {
                let mut g = vec![0i32; cols];
                for (j, &p) in perm.iter().enumerate() {
                    g[p] = (j / gs) as i32;
                }
                Some(g)
            } else {
                None
            };
            (scales, zeros, g_idx)
        }
        (Strategy::Tensor, Some((s, z))) => (vec![s[0]], vec![z[0]], None),
        (_, Some((s, z))) => (s, z, None),
        (_, None) => unreachable!(),
    };
    let quant = QuantizedLinear {
        args: args.clone(),
        codes: out_codes,
        scales,
        zeros: (!args.symmetric).then(|| zeros.iter().map(|&z| z as i8).collect()),
        g_idx,
        static_order: act_order && static_groups,
        true_sequential: false,
        scale_dtype,
        shape: (rows, cols),
    };
    let dequant = quant.dequantize();
    Ok(GptqResult {
        quant,
        dequant,
        loss: loss_rows.iter().sum(),
        damp: used_damp,
    })
}

impl Pass for Gptq {
    fn name(&self) -> String {
        "gptq".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            hessian: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let groups: Vec<Vec<&str>> = if self.spec.true_sequential {
            Site::ALL.iter().map(|s| s.linears().to_vec()).collect()
        } else {
            vec![LINEARS.to_vec()]
        };
        if !self.spec.true_sequential {
            // every linear's statistics from the layer's original inputs, one forward
            ctx.refresh()?;
        }
        for group in groups {
            if self.spec.true_sequential {
                // statistics on the current (partially quantized) layer
                ctx.invalidate();
            }
            for name in group {
                let module = ctx.module_name(name);
                if !self.select.selects(&module) {
                    continue;
                }
                let t = Instant::now();
                let h = ctx
                    .stats(Site::of(name))?
                    .hessian()
                    .ok_or_else(|| anyhow::anyhow!("no Hessian collected"))?;
                let lin = &ctx.layer.linears[name];
                let mut r = gptq_quantize(
                    lin.weight(),
                    &h,
                    &self.args,
                    scale_dtype_for(lin.dtype),
                    self.spec.damp,
                    self.spec.block_size,
                    self.spec.act_order(),
                    self.spec.static_groups(),
                )
                .map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
                let rel = crate::linalg::rel_output_error(lin.weight(), &r.dequant, &h);
                if r.damp != self.spec.damp {
                    ctx.warn(format!(
                        "{module}: Cholesky failed with damp {}, succeeded with damp {}",
                        self.spec.damp, r.damp
                    ));
                }
                r.quant.true_sequential = self.spec.true_sequential;
                let lin = ctx.layer.linears.get_mut(name).expect("linear present");
                lin.set_quantized(r.quant)
                    .map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
                let mut notes = std::collections::BTreeMap::new();
                notes.insert("damp".into(), json!(r.damp));
                ctx.records.push(LinearRecord {
                    layer: ctx.index(),
                    linear: name.to_string(),
                    pass: "gptq".into(),
                    rel_output_error: Some(rel),
                    loss: Some(r.loss),
                    seconds: t.elapsed().as_secs_f64(),
                    notes,
                });
            }
        }
        Ok(())
    }
}
