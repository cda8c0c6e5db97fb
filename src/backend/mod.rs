//! Execution backends. The CPU path (faer for GEMM and factorizations, our kernels in
//! `model/ops.rs` and `model/attention.rs`, rayon, ndarray for host matrices) is always built;
//! the CUDA path (cudarc with dynamic loading, kernels from `kernels/*.cu` compiled by NVRTC at
//! run time) is behind the `cuda` cargo feature.
//!
//! A run selects its device once ([`activate`], from the pipeline's `device:` or `--device`);
//! passes then ask for device primitives through the functions here ([`rtn`], [`gptq_sweep`]),
//! which answer `None` (or fall back to the CPU) when no GPU is active. Passes never see
//! cudarc types, and the CPU build has no CUDA code at all.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_bench;
#[cfg(feature = "cuda")]
pub mod cuda_layer;

use crate::model::DType;
use crate::quant::{Observer, QuantArgs, QuantizedLinear, Strategy};
use anyhow::Result;
use ndarray::ArrayView2;

/// Whether a CUDA device can be used in this build and on this machine.
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        // With dynamic loading, cudarc panics when libcuda is absent: treat that as "no GPU".
        cuda::guarded("libcuda", || {
            Ok(cudarc::driver::CudaContext::device_count().map(|n| n > 0)?)
        })
        .unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[cfg(feature = "cuda")]
static GPU: std::sync::OnceLock<std::sync::Mutex<cuda::Gpu>> = std::sync::OnceLock::new();

/// Make CUDA device `ordinal` the device of this process's passes; returns its name. Errors
/// (no driver, no such device, kernels that do not compile) name what is missing.
pub fn activate(ordinal: usize) -> Result<String> {
    #[cfg(feature = "cuda")]
    {
        if let Some(g) = GPU.get() {
            let g = g.lock().map_err(|_| anyhow::anyhow!("GPU lock poisoned"))?;
            return Ok(g.name.clone());
        }
        let gpu = cuda::Gpu::new(ordinal)?;
        let name = gpu.name.clone();
        let _ = GPU.set(std::sync::Mutex::new(gpu));
        Ok(name)
    }
    #[cfg(not(feature = "cuda"))]
    {
        anyhow::bail!(
            "device cuda:{ordinal}: this build has no CUDA support (rebuild with `--features cuda`)"
        )
    }
}

/// The active GPU's name, if any.
pub fn active_device() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        GPU.get()
            .and_then(|g| g.lock().ok().map(|g| g.name.clone()))
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

static SUSPENDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static DEVICE_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Run `f` with the active GPU set aside (process-wide): the CPU reference of a comparison
/// made in the same process. Not for concurrent use with device work.
pub fn cpu_only<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::Ordering::SeqCst;
    let prev = SUSPENDED.swap(true, SeqCst);
    let r = f();
    SUSPENDED.store(prev, SeqCst);
    r
}

/// How many primitives ran on the GPU so far in this process (RTN matrices, GPTQ sweeps): a
/// run can show that its work went to the device.
pub fn device_calls() -> usize {
    DEVICE_CALLS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Run `f` on the active GPU, if one is active (and not set aside by [`cpu_only`]).
#[cfg(feature = "cuda")]
pub fn with_gpu<R>(f: impl FnOnce(&cuda::Gpu) -> R) -> Option<R> {
    use std::sync::atomic::Ordering::SeqCst;
    if SUSPENDED.load(SeqCst) {
        return None;
    }
    let g = GPU.get()?;
    let g = g.lock().ok()?;
    DEVICE_CALLS.fetch_add(1, SeqCst);
    Some(f(&g))
}

/// Parameters fixed before the sweep (channel strategy, static groups): `scales`/`zeros`
/// [rows, n_groups], and `gcol[i]` the group of processing column i.
pub struct FixedParams<'a> {
    pub scales: &'a [f32],
    pub zeros: &'a [i32],
    pub gcol: &'a [i32],
}

/// One GPTQ column sweep for the device (the CPU sweep is `passes::sweep`): `w` [rows, cols]
/// row-major with columns in processing order, `h` [cols, cols] f64 permuted alike (dead inputs
/// already fixed), min/max group parameters computed at group boundaries unless `fixed`.
pub struct SweepJob<'a> {
    pub w: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub h: &'a [f64],
    pub damp: f64,
    pub block_size: usize,
    pub gs: usize,
    pub n_groups: usize,
    pub bits: u32,
    pub sym: bool,
    /// 0 = f32, 1 = bf16, 2 = f16 (the rounding of the stored dequantized value).
    pub scale_dtype: i32,
    pub fixed: Option<FixedParams<'a>>,
}

/// What a device sweep returns: codes [rows, cols] in processing order, the dynamic group
/// parameters [rows, n_groups] (unused with fixed ones), Σ e² per row, the damp used.
pub struct SweepOut {
    pub codes: Vec<i8>,
    pub dyn_scales: Vec<f32>,
    pub dyn_zeros: Vec<i32>,
    pub loss: Vec<f64>,
    pub damp: f64,
}

/// The device code of a dtype's rounding (kernels/quant.cu `DT_*`); `None` for dtypes the
/// kernels do not round to.
pub fn dtype_code(d: DType) -> Option<i32> {
    match d {
        DType::F32 => Some(0),
        DType::BF16 => Some(1),
        DType::F16 => Some(2),
        _ => None,
    }
}

/// GPTQ's sweep on the active GPU; `None` when no GPU is active (the caller sweeps on the CPU).
pub fn gptq_sweep(job: &SweepJob) -> Option<Result<SweepOut>> {
    #[cfg(feature = "cuda")]
    {
        with_gpu(|g| g.gptq_sweep(job))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = job;
        None
    }
}

/// Round-to-nearest quantization of `w` [out, in]: on the active GPU where the kernel covers
/// the scheme (min/max observer, group or channel strategy), bit-identical with the CPU's
/// [`crate::quant::quantize_rtn`], which runs otherwise.
pub fn rtn(w: ArrayView2<f32>, args: &QuantArgs, dtype: DType) -> Result<QuantizedLinear> {
    #[cfg(feature = "cuda")]
    {
        let covered = args.observer == Observer::MinMax
            && matches!(args.strategy, Strategy::Group | Strategy::Channel);
        if let (true, Some(code)) = (covered, dtype_code(dtype)) {
            let (out, inn) = w.dim();
            let gs = args.group_width(inn);
            args.validate()?;
            args.groups_per_row(inn)?;
            let flat: Vec<f32> = w.iter().copied().collect();
            if let Some(r) =
                with_gpu(|g| g.rtn(&flat, out, inn, gs, args.bits, args.symmetric, code))
            {
                let (codes, scales, zeros) = r?;
                return Ok(QuantizedLinear {
                    args: args.clone(),
                    codes,
                    scales,
                    zeros: (!args.symmetric).then(|| zeros.iter().map(|&z| z as i8).collect()),
                    g_idx: None,
                    static_order: false,
                    true_sequential: false,
                    scale_dtype: dtype,
                    global_scale: None,
                    shape: (out, inn),
                });
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (Observer::MinMax, Strategy::Group);
    crate::quant::quantize_rtn(w, args, dtype)
}
