//! The differentiable decoder block ([`Block`]): its forward, which keeps a [`Tape`], and the
//! backward that walks the tape in reverse, step by step.

use super::adjoints::{
    causal_attention_backward, heads_untranspose, rms_norm_backward, rope_transpose_backward,
};
use super::eff::Eff;
use super::params::{Field, Params};
use crate::config::ModelConfig;
use crate::model::layer::LayerWeights;
use crate::model::llama::{Act, Rope};
use crate::model::ops;
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

/// What the forward keeps for the backward.
pub struct Tape {
    b: usize,
    t: usize,
    x: Vec<f32>,
    h1: Vec<f32>,
    /// q, k before the per-head norms (Qwen3) — the norms' inputs.
    q_pre: Vec<f32>,
    k_pre: Vec<f32>,
    /// After RoPE and the head transpose, [b, h, t, hd].
    qr: Vec<f32>,
    kr: Vec<f32>,
    vt: Vec<f32>,
    attn: Vec<f32>,
    r: Vec<f32>,
    h2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    act: Vec<f32>,
}

/// The decoder block with parameters `p` (and everything else from `layer`), differentiable.
pub struct Block<'a> {
    cfg: &'a ModelConfig,
    layer: &'a LayerWeights,
    p: &'a Params,
    lin: std::collections::BTreeMap<&'a str, Eff<'a>>,
}

impl<'a> Block<'a> {
    pub fn new(layer: &'a LayerWeights, cfg: &'a ModelConfig, p: &'a Params) -> Result<Self> {
        Self::with_rounding(layer, cfg, p, true)
    }

    /// `round_zeros: false` evaluates zero points as given (real-valued): the function whose
    /// derivative the straight-through gradient is (for the finite-difference check).
    pub(super) fn with_rounding(
        layer: &'a LayerWeights,
        cfg: &'a ModelConfig,
        p: &'a Params,
        round_zeros: bool,
    ) -> Result<Self> {
        let mut lin = std::collections::BTreeMap::new();
        for (name, l) in &layer.linears {
            lin.insert(name.as_str(), Eff::new(name, l, p, round_zeros)?);
        }
        Ok(Block { cfg, layer, p, lin })
    }

    fn norm(&self, name: &str) -> Result<&[f32]> {
        if let Some(v) = self.p.get(name, Field::Norm) {
            return Ok(v);
        }
        self.layer
            .norms
            .get(name)
            .map(|(v, _)| v.as_slice())
            .with_context(|| format!("layer {}: missing `{name}`", self.layer.index))
    }

    fn eff(&self, name: &str) -> Result<&Eff<'a>> {
        self.lin
            .get(name)
            .with_context(|| format!("layer {}: missing `{name}`", self.layer.index))
    }

    /// The block output on `x`, and the tape for [`Block::backward`].
    pub fn forward(&self, x: &Act, rope: &Rope) -> Result<(Vec<f32>, Tape)> {
        let cfg = self.cfg;
        let (b, t) = (x.b, x.t);
        let n = b * t;
        let d = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let (cos, sin, max_t) = rope.tables();
        ensure!(
            t <= max_t,
            "sequence of {t} tokens exceeds the RoPE table ({max_t})"
        );
        ensure!(x.data.len() == n * d, "hidden state has the wrong size");
        let (at, norm) = (&cfg.block().attention, cfg.block().mlp.norm);
        let mlp = cfg.dense_mlp("distillation's backward")?;
        let h1 = ops::rms_norm(&x.data, d, self.norm(at.norm)?, eps);
        let q_pre = self.eff(at.q)?.forward(&h1, n);
        let k_pre = self.eff(at.k)?.forward(&h1, n);
        let v = self.eff(at.v)?.forward(&h1, n);
        let (q, k) = if let Some((qn, kn)) = at.qk_norm {
            (
                ops::rms_norm(&q_pre, hd, self.norm(qn)?, eps),
                ops::rms_norm(&k_pre, hd, self.norm(kn)?, eps),
            )
        } else {
            (q_pre.clone(), k_pre.clone())
        };
        let qr = ops::rope_transpose(&q, b, t, nh, hd, cos, sin);
        let kr = ops::rope_transpose(&k, b, t, nkv, hd, cos, sin);
        let vt = ops::heads_transpose(&v, b, t, nkv, hd);
        let attn = crate::model::attention::causal_attention(&qr, &kr, &vt, b, nh, nkv, t, hd);
        let o = self.eff(at.o)?.forward(&attn, n);
        let mut r = x.data.clone();
        ops::add_assign(&mut r, &o);
        let h2 = ops::rms_norm(&r, d, self.norm(norm)?, eps);
        let g = self.eff(mlp.gate)?.forward(&h2, n);
        let u = self.eff(mlp.up)?.forward(&h2, n);
        let act = ops::silu_mul(&g, &u);
        let dn = self.eff(mlp.down)?.forward(&act, n);
        let mut y = r.clone();
        ops::add_assign(&mut y, &dn);
        let tape = Tape {
            b,
            t,
            x: x.data.clone(),
            h1,
            q_pre,
            k_pre,
            qr,
            kr,
            vt,
            attn,
            r,
            h2,
            g,
            u,
            act,
        };
        Ok((y, tape))
    }

    /// ∂L/∂x for ∂L/∂y = `dy`, adding the parameter gradients into `grads` (the layout of
    /// `Params::zeros_like` of this block's parameters).
    pub fn backward(
        &self,
        tape: &Tape,
        dy: &[f32],
        rope: &Rope,
        grads: &mut Params,
    ) -> Result<Vec<f32>> {
        let cfg = self.cfg;
        let (b, t) = (tape.b, tape.t);
        let n = b * t;
        let d = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let (cos, sin, _) = rope.tables();
        ensure!(dy.len() == n * d, "output gradient has the wrong size");
        // y = r + down(a): ∂r = ∂y, ∂a = down'ᵀ ∂y
        let (at, norm) = (&cfg.block().attention, cfg.block().mlp.norm);
        let mlp = cfg.dense_mlp("distillation's backward")?;
        let da = self.eff(mlp.down)?.backward(&tape.act, dy, n, grads);
        // a = silu(g) u
        let mut dg = vec![0f32; da.len()];
        let mut du = vec![0f32; da.len()];
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(
                da.par_chunks(4096)
                    .zip(tape.g.par_chunks(4096).zip(tape.u.par_chunks(4096))),
            )
            .for_each(|((dg, du), (da, (g, u)))| {
                for i in 0..da.len() {
                    let s = 1.0 / (1.0 + crate::model::ops::exp_f32(-g[i]));
                    du[i] = da[i] * g[i] * s;
                    dg[i] = da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            });
        let mut dh2 = self.eff(mlp.gate)?.backward(&tape.h2, &dg, n, grads);
        ops::add_assign(
            &mut dh2,
            &self.eff(mlp.up)?.backward(&tape.h2, &du, n, grads),
        );
        // h₂ = RMSNorm(r): ∂r = ∂y + RMSNorm'ᵀ ∂h₂
        let mut dr = {
            let name = norm;
            let gi = grads.index(name, Field::Norm);
            let dgam = gi.map(|i| grads.list[i].values.as_mut_slice());
            rms_norm_backward(&tape.r, d, self.norm(name)?, eps, &dh2, dgam)
        };
        ops::add_assign(&mut dr, dy);
        // r = x + o_proj(A)
        let dattn = self.eff(at.o)?.backward(&tape.attn, &dr, n, grads);
        let (dqr, dkr, dvt) =
            causal_attention_backward(&tape.qr, &tape.kr, &tape.vt, &dattn, b, nh, nkv, t, hd);
        let mut dq = rope_transpose_backward(&dqr, b, t, nh, hd, cos, sin);
        let mut dk = rope_transpose_backward(&dkr, b, t, nkv, hd, cos, sin);
        let dv = heads_untranspose(&dvt, b, t, nkv, hd);
        if let Some((qn, kn)) = at.qk_norm {
            for (name, pre, dd) in [(qn, &tape.q_pre, &mut dq), (kn, &tape.k_pre, &mut dk)] {
                let gi = grads.index(name, Field::Norm);
                let dgam = gi.map(|i| grads.list[i].values.as_mut_slice());
                *dd = rms_norm_backward(pre, hd, self.norm(name)?, eps, dd, dgam);
            }
        }
        let mut dh1 = self.eff(at.q)?.backward(&tape.h1, &dq, n, grads);
        ops::add_assign(&mut dh1, &self.eff(at.k)?.backward(&tape.h1, &dk, n, grads));
        ops::add_assign(&mut dh1, &self.eff(at.v)?.backward(&tape.h1, &dv, n, grads));
        let name = at.norm;
        let gi = grads.index(name, Field::Norm);
        let dgam = gi.map(|i| grads.list[i].values.as_mut_slice());
        let mut dx = rms_norm_backward(&tape.x, d, self.norm(name)?, eps, &dh1, dgam);
        ops::add_assign(&mut dx, &dr);
        Ok(dx)
    }
}
