//! The CUDA device: cudarc with dynamic loading (no toolkit or nvcc at build time), cuBLAS for
//! products, cuSOLVER for the Cholesky factors, and our kernels from `kernels/*.cu`, embedded in
//! the binary and compiled by NVRTC at first use for the device's architecture; the PTX is
//! cached on disk by a hash of source, options and architecture (`$COMPRESS_KERNEL_CACHE`, else
//! `$XDG_CACHE_HOME/compress/ptx`, else `~/.cache/compress/ptx`).
//!
//! Only primitives live here (RTN, the GPTQ block sweep, Hessians, factorizations); the
//! algorithms that drive them stay in `passes/` and ask for the device through
//! [`super::gptq_sweep`] / [`super::rtn`].

mod elementwise;
mod factor;
mod gemm;
mod kernels;
mod nvrtc;
mod quantize;
mod sol;

pub use kernels::{arch_for, compile, LAYER_CU, QUANT_CU, UTIL_CU};
pub use quantize::DevSweep;

use anyhow::{bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use sol::check_sol;
use std::sync::Arc;

/// Run `f`, turning cudarc's panic on a missing shared library into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(prev);
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            bail!("{what}: {msg}")
        }
    }
}

/// One CUDA device with its stream, libraries and compiled kernels.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    sol: sol::Lib,
    solver: sol::Handle,
    quant: Arc<CudaModule>,
    util: Arc<CudaModule>,
    pub(crate) layer: Arc<CudaModule>,
    pub name: String,
    pub arch: &'static str,
}

// The cuSOLVER handle is used from one thread at a time (the backend keeps the Gpu in a Mutex).
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Drop for Gpu {
    fn drop(&mut self) {
        unsafe {
            let _ = (self.sol.destroy)(self.solver);
        }
    }
}

pub(crate) fn blocks(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(threads as u64).max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// Open device `ordinal`, load cuBLAS and cuSOLVER, and compile (or load cached) kernels.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        guarded("CUDA driver (libcuda)", || {
            let n = CudaContext::device_count().context("cuDeviceGetCount")?;
            if ordinal as i32 >= n {
                bail!("cuda:{ordinal}: this machine has {n} CUDA device(s)");
            }
            let ctx = CudaContext::new(ordinal).with_context(|| format!("cuda:{ordinal}"))?;
            let stream = ctx.default_stream();
            let name = ctx.name().unwrap_or_else(|_| "unknown".into());
            use cudarc::driver::sys::CUdevice_attribute as A;
            let major = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let arch = arch_for(major, minor)?;
            let quant = ctx.load_module(compile("quant", QUANT_CU, arch)?)?;
            let util = ctx.load_module(compile("util", UTIL_CU, arch)?)?;
            let layer = ctx.load_module(compile("layer", LAYER_CU, arch)?)?;
            let blas = CudaBlas::new(stream.clone()).context("cuBLAS (libcublas)")?;
            ctx.bind_to_thread()?;
            let sol = sol::Lib::load()?;
            let mut solver: sol::Handle = std::ptr::null_mut();
            unsafe {
                check_sol("create", (sol.create)(&mut solver))?;
                check_sol(
                    "set stream",
                    (sol.set_stream)(solver, stream.cu_stream() as *mut std::ffi::c_void),
                )?;
            }
            Ok(Gpu {
                ctx,
                stream,
                blas,
                sol,
                solver,
                quant,
                util,
                layer,
                name,
                arch,
            })
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn f(&self, module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
        module
            .load_function(name)
            .with_context(|| format!("kernel {name}"))
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread()?;
        Ok(cudarc::driver::result::mem_get_info()?)
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}
