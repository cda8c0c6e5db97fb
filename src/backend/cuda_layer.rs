//! The Llama-family decoder layer on the GPU, in f32: the same steps as
//! `model::llama::DecoderLayer::forward` (RMSNorm → q/k/v → optional q/k norm → RoPE → causal
//! GQA attention → o_proj → residual → RMSNorm → SwiGLU → down_proj → residual), products by
//! cuBLAS SGEMM, the rest by `kernels/layer.cu`. A layer's weights are uploaded once
//! ([`GpuLayer::upload`]) and stay on the device while the calibration batches run through it.
//!
//! The engine runs its calibration forwards through it when a GPU is active (statistics are
//! still accumulated on the host from the downloaded site inputs); `tests/cuda.rs` checks it
//! against the CPU forward.

use super::cuda::{blocks, Gpu};
use anyhow::{ensure, Context, Result};
use cudarc::cublas::sys as cublas_sys;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use std::collections::BTreeMap;

use crate::model::arch::{Attention, Swiglu};
use crate::model::config::ModelConfig;
use crate::model::layer::{LayerWeights, Site};
use crate::model::llama::{Hook, StatsHook};

/// A hook on a site's input while it is still on the device.
type DevHook<'a> = dyn FnMut(Site, &CudaSlice<f32>, usize, usize) -> Result<()> + 'a;

/// One linear on the device: W [out, in] f32 row-major and its bias.
struct DevLinear {
    w: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
    out: usize,
    inn: usize,
}

/// A decoder layer's weights on the device.
pub struct GpuLayer {
    linears: BTreeMap<String, DevLinear>,
    norms: BTreeMap<String, CudaSlice<f32>>,
    hidden: usize,
    inter: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    eps: f32,
    /// The block's module names (attention and MLP parts).
    attention: Attention,
    mlp_norm: &'static str,
    mlp_input: Site,
    mlp: Swiglu,
}

/// RoPE tables on the device ([max_t, hd/2] each).
pub struct GpuRope {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    max_t: usize,
}

impl GpuRope {
    /// The same tables as `model::llama::Rope::new`.
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, max_t: usize) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let mut cos = Vec::with_capacity(max_t * inv.len());
        let mut sin = Vec::with_capacity(max_t * inv.len());
        for t in 0..max_t {
            for f in &inv {
                let a = *f * t as f32;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let s = gpu.stream();
        Ok(GpuRope {
            cos: s.memcpy_stod(&cos)?,
            sin: s.memcpy_stod(&sin)?,
            max_t,
        })
    }
}

impl GpuLayer {
    /// Upload the f32 matrices the layer's linears compute (`Linear::weight`: quantized ones
    /// dequantized, factored ones multiplied back) and its norms.
    pub fn upload(gpu: &Gpu, w: &LayerWeights, cfg: &ModelConfig) -> Result<Self> {
        let s = gpu.stream();
        let mut linears = BTreeMap::new();
        for (name, lin) in &w.linears {
            ensure!(
                lin.act_quant().is_none(),
                "{name}: activation quantization is not implemented on the GPU forward"
            );
            let m = lin.weight();
            let (out, inn) = m.dim();
            let flat = m.as_slice().context("weight not contiguous")?;
            linears.insert(
                name.clone(),
                DevLinear {
                    w: s.memcpy_stod(flat)?,
                    bias: match &lin.bias {
                        Some(b) => Some(s.memcpy_stod(b)?),
                        None => None,
                    },
                    out,
                    inn,
                },
            );
        }
        let mut norms = BTreeMap::new();
        for (name, (v, _)) in &w.norms {
            norms.insert(name.clone(), s.memcpy_stod(v)?);
        }
        Ok(GpuLayer {
            linears,
            norms,
            hidden: cfg.hidden_size,
            inter: cfg.intermediate_size,
            nh: cfg.num_heads,
            nkv: cfg.num_kv_heads,
            hd: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
            attention: cfg.block().attention,
            mlp_norm: cfg.block().mlp.norm,
            mlp_input: cfg.block().mlp.input,
            mlp: *cfg.dense_mlp("the GPU layer")?,
        })
    }

    fn norm(&self, name: &str) -> Result<&CudaSlice<f32>> {
        self.norms
            .get(name)
            .with_context(|| format!("missing norm `{name}`"))
    }

    /// y [n, out] = x [n, in] · Wᵀ (+ bias).
    fn linear(
        &self,
        gpu: &Gpu,
        name: &str,
        x: &CudaSlice<f32>,
        n: usize,
    ) -> Result<CudaSlice<f32>> {
        let l = self
            .linears
            .get(name)
            .with_context(|| format!("missing linear `{name}`"))?;
        let s = gpu.stream();
        let mut y = s.alloc_zeros::<f32>(n * l.out)?;
        // column-major: Yᵀ [out, n] = W (as Wᵀ col-major [in, out], op T) · Xᵀ [in, n]
        let cfg = GemmConfig {
            transa: cublas_sys::cublasOperation_t::CUBLAS_OP_T,
            transb: cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: l.out as i32,
            n: n as i32,
            k: l.inn as i32,
            alpha: 1.0f32,
            lda: l.inn as i32,
            ldb: l.inn as i32,
            beta: 0.0f32,
            ldc: l.out as i32,
        };
        unsafe { gpu.blas.gemm(cfg, &l.w, x, &mut y) }?;
        if let Some(b) = &l.bias {
            let f = gpu.f(&gpu.layer, "add_bias")?;
            let (nn, d) = ((n * l.out) as i64, l.out as i32);
            let mut lb = s.launch_builder(&f);
            lb.arg(&mut y).arg(b).arg(&nn).arg(&d);
            unsafe { lb.launch(blocks(n * l.out, 256)) }?;
        }
        Ok(y)
    }

    fn rms_norm(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        rows: usize,
        d: usize,
    ) -> Result<CudaSlice<f32>> {
        let s = gpu.stream();
        let mut y = s.alloc_zeros::<f32>(rows * d)?;
        let f = gpu.f(&gpu.layer, "rms_norm")?;
        let (di, eps) = (d as i32, self.eps);
        let mut l = s.launch_builder(&f);
        l.arg(x).arg(g).arg(&mut y).arg(&di).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }?;
        Ok(y)
    }

    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<f32>,
        rope: &GpuRope,
        b: usize,
        t: usize,
        h: usize,
        rotate: bool,
    ) -> Result<CudaSlice<f32>> {
        let s = gpu.stream();
        let hd = self.hd;
        let mut y = s.alloc_zeros::<f32>(b * t * h * hd)?;
        let f = gpu.f(&gpu.layer, "rope_transpose")?;
        let a = [b as i32, t as i32, h as i32, hd as i32, rotate as i32];
        let mut l = s.launch_builder(&f);
        l.arg(x).arg(&mut y).arg(&rope.cos).arg(&rope.sin);
        for v in &a {
            l.arg(v);
        }
        unsafe { l.launch(blocks(b * t * h * hd / 2, 256)) }?;
        Ok(y)
    }

    /// The layer on hidden states x [b, t, hidden] (host, row-major); returns the output.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &GpuRope,
    ) -> Result<Vec<f32>> {
        // nothing but the output comes back: no site input is downloaded
        let mut no_hook = |_: Site, _: &CudaSlice<f32>, _: usize, _: usize| Ok(());
        self.forward_dev(gpu, x, b, t, rope, &mut no_hook, None)?
            .context("forward stopped early")
    }

    /// As `DecoderLayer::forward_until`: the hook sees each site's input (downloaded to the
    /// host) and the run stops right after `stop`'s (then `None`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_hooked(
        &self,
        gpu: &Gpu,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &GpuRope,
        hook: &mut Hook,
        stop: Option<Site>,
    ) -> Result<Option<Vec<f32>>> {
        let s = gpu.stream().clone();
        let mut dev_hook = |site: Site, v: &CudaSlice<f32>, rows: usize, d: usize| -> Result<()> {
            hook(site, &s.memcpy_dtov(v)?, rows, d)
        };
        self.forward_dev(gpu, x, b, t, rope, &mut dev_hook, stop)
    }

    /// As [`GpuLayer::forward_hooked`], and each site's XᵀX [d, d] computed on the device
    /// (SGEMM, f32) comes back with its rows: the Hessian statistic without a host GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_grams(
        &self,
        gpu: &Gpu,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &GpuRope,
        hook: &mut StatsHook,
        grams: bool,
        stop: Option<Site>,
    ) -> Result<Option<Vec<f32>>> {
        let s = gpu.stream().clone();
        let mut dev_hook = |site: Site, v: &CudaSlice<f32>, rows: usize, d: usize| -> Result<()> {
            let g = if grams {
                Some(gpu.gram(v, rows, d)?)
            } else {
                None
            };
            hook(site, &s.memcpy_dtov(v)?, rows, d, g.as_deref())
        };
        self.forward_dev(gpu, x, b, t, rope, &mut dev_hook, stop)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_dev(
        &self,
        gpu: &Gpu,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &GpuRope,
        hook: &mut DevHook,
        stop: Option<Site>,
    ) -> Result<Option<Vec<f32>>> {
        let s = gpu.stream();
        let (d, n) = (self.hidden, b * t);
        ensure!(x.len() == n * d, "hidden state has the wrong size");
        ensure!(
            t <= rope.max_t,
            "sequence of {t} tokens exceeds the RoPE table ({})",
            rope.max_t
        );
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let mut r = s.memcpy_stod(x)?;
        // --- attention ---
        let h = self.rms_norm(gpu, &r, self.norm(self.attention.norm)?, n, d)?;
        let at = self.attention;
        hook(at.input, &h, n, d)?;
        if stop == Some(at.input) {
            return Ok(None);
        }
        let mut q = self.linear(gpu, at.q, &h, n)?;
        let mut k = self.linear(gpu, at.k, &h, n)?;
        let v = self.linear(gpu, at.v, &h, n)?;
        drop(h);
        if let Some((qn, kn)) = at.qk_norm {
            q = self.rms_norm(gpu, &q, self.norm(qn)?, n * nh, hd)?;
            k = self.rms_norm(gpu, &k, self.norm(kn)?, n * nkv, hd)?;
        }
        let q = self.rope(gpu, &q, rope, b, t, nh, true)?;
        let k = self.rope(gpu, &k, rope, b, t, nkv, true)?;
        let v = self.rope(gpu, &v, rope, b, t, nkv, false)?;
        let mut attn = s.alloc_zeros::<f32>(n * nh * hd)?;
        let f = gpu.f(&gpu.layer, "causal_attention")?;
        let threads = 128u32;
        let a = [b as i32, nh as i32, nkv as i32, t as i32, hd as i32];
        let scale = 1.0f32 / (hd as f32).sqrt();
        let mut l = s.launch_builder(&f);
        l.arg(&q).arg(&k).arg(&v).arg(&mut attn);
        for x in &a {
            l.arg(x);
        }
        l.arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: ((b * nh * t) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: ((t + threads as usize) * 4) as u32,
        };
        unsafe { l.launch(cfg) }?;
        drop((q, k, v));
        hook(at.o_in, &attn, n, nh * hd)?;
        if stop == Some(at.o_in) {
            return Ok(None);
        }
        let o = self.linear(gpu, at.o, &attn, n)?;
        drop(attn);
        self.add(gpu, &mut r, &o)?;
        drop(o);
        // --- MLP (SwiGLU) ---
        let h = self.rms_norm(gpu, &r, self.norm(self.mlp_norm)?, n, d)?;
        hook(self.mlp_input, &h, n, d)?;
        if stop == Some(self.mlp_input) {
            return Ok(None);
        }
        let g = self.linear(gpu, self.mlp.gate, &h, n)?;
        let u = self.linear(gpu, self.mlp.up, &h, n)?;
        drop(h);
        let ni = n * self.inter;
        let mut act = s.alloc_zeros::<f32>(ni)?;
        let f = gpu.f(&gpu.layer, "silu_mul")?;
        let nn = ni as i64;
        let mut l = s.launch_builder(&f);
        l.arg(&g).arg(&u).arg(&mut act).arg(&nn);
        unsafe { l.launch(blocks(ni, 256)) }?;
        drop((g, u));
        hook(self.mlp.down_in, &act, n, self.inter)?;
        if stop == Some(self.mlp.down_in) {
            return Ok(None);
        }
        let dn = self.linear(gpu, self.mlp.down, &act, n)?;
        self.add(gpu, &mut r, &dn)?;
        Ok(Some(s.memcpy_dtov(&r)?))
    }

    fn add(&self, gpu: &Gpu, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        let s = gpu.stream();
        let f = gpu.f(&gpu.layer, "add_assign")?;
        let n = x.len();
        let nn = n as i64;
        let mut l = s.launch_builder(&f);
        l.arg(x).arg(y).arg(&nn);
        unsafe { l.launch(blocks(n, 256)) }?;
        Ok(())
    }
}
