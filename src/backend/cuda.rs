//! The CUDA device: cudarc with dynamic loading (no toolkit or nvcc at build time), cuBLAS for
//! products, cuSOLVER for the Cholesky factors, and our kernels from `kernels/*.cu`, embedded in
//! the binary and compiled by NVRTC at first use for the device's architecture; the PTX is
//! cached on disk by a hash of source, options and architecture (`$COMPRESS_KERNEL_CACHE`, else
//! `$XDG_CACHE_HOME/compress/ptx`, else `~/.cache/compress/ptx`).
//!
//! Only primitives live here (RTN, the GPTQ block sweep, Hessians, factorizations); the
//! algorithms that drive them stay in `passes/` and ask for the device through
//! [`super::gptq_sweep`] / [`super::rtn`].

use super::{SweepJob, SweepOut};
use anyhow::{bail, Context, Result};
use cudarc::cublas::sys as cublas_sys;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::path::PathBuf;
use std::sync::Arc;

/// Kernel sources, embedded so the binary is self-contained.
pub const QUANT_CU: &str = include_str!("../../kernels/quant.cu");
pub const UTIL_CU: &str = include_str!("../../kernels/util.cu");
pub const LAYER_CU: &str = include_str!("../../kernels/layer.cu");

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

/// The NVRTC options every kernel is built with: no FMA contraction, IEEE division and square
/// root, no flush to zero — each f32 operation rounds once, in the order written, like the CPU.
fn options(arch: &'static str) -> CompileOptions {
    CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(false),
        arch: Some(arch),
        ..Default::default()
    }
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("COMPRESS_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("compress/ptx"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/compress/ptx"))
}

/// Compile `src` for `arch` with NVRTC, or read the cached PTX. Needs libnvrtc, not a GPU.
pub fn compile(name: &str, src: &str, arch: &'static str) -> Result<Ptx> {
    use sha2::{Digest, Sha256};
    let opts = options(arch);
    let key = {
        let mut h = Sha256::new();
        h.update(src.as_bytes());
        h.update(format!("{:?}", opts.clone().build_for_key()).as_bytes());
        h.update(arch.as_bytes());
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let cached = cache_dir().map(|d| d.join(format!("{name}-{}.ptx", &key[..16])));
    if let Some(p) = &cached {
        if let Ok(s) = std::fs::read_to_string(p) {
            return Ok(Ptx::from_src(s));
        }
    }
    let ptx = nvrtc::compile(src, &opts.clone().build_for_key_flags(), name)?;
    if let Some(p) = &cached {
        // Best effort: a cache that cannot be written only costs a recompile next time.
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, ptx.to_src()).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
    Ok(ptx)
}

/// `CompileOptions` as NVRTC flags (also the cache key).
trait KeyFlags {
    fn build_for_key(self) -> Vec<String>;
    fn build_for_key_flags(self) -> Vec<String>;
}
impl KeyFlags for CompileOptions {
    fn build_for_key(self) -> Vec<String> {
        self.build_for_key_flags()
    }
    fn build_for_key_flags(self) -> Vec<String> {
        let b = |n: &str, v: Option<bool>| v.map(|v| format!("--{n}={v}"));
        [
            b("ftz", self.ftz),
            b("prec-sqrt", self.prec_sqrt),
            b("prec-div", self.prec_div),
            b("fmad", self.fmad),
            self.arch.map(|a| format!("--gpu-architecture={a}")),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// NVRTC loaded by hand: the seven entry points we use exist unchanged from CUDA 11 to 13,
/// while cudarc's binding of one version wants all of that version's symbols (NVRTC 13 dropped
/// `nvrtcGetNVVM`, which the 12.x binding lists).
mod nvrtc {
    use anyhow::{bail, Result};
    use cudarc::nvrtc::Ptx;
    use std::ffi::{c_char, c_void, CString};
    type Prog = *mut c_void;
    type Create = unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        i32,
        *const *const c_char,
        *const *const c_char,
    ) -> i32;
    type Compile = unsafe extern "C" fn(Prog, i32, *const *const c_char) -> i32;
    type Size = unsafe extern "C" fn(Prog, *mut usize) -> i32;
    type Get = unsafe extern "C" fn(Prog, *mut c_char) -> i32;
    type Destroy = unsafe extern "C" fn(*mut Prog) -> i32;

    struct Lib {
        _lib: libloading::Library,
        create: Create,
        compile: Compile,
        log_size: Size,
        log: Get,
        ptx_size: Size,
        ptx: Get,
        destroy: Destroy,
    }

    fn load() -> Result<&'static Lib> {
        static LIB: std::sync::OnceLock<std::result::Result<Lib, String>> =
            std::sync::OnceLock::new();
        let r = LIB.get_or_init(|| {
            let names = [
                "libnvrtc.so",
                "libnvrtc.so.13",
                "libnvrtc.so.12",
                "libnvrtc.so.11.2",
            ];
            let mut errs = Vec::new();
            for n in names {
                let lib = match unsafe { libloading::Library::new(n) } {
                    Ok(l) => l,
                    Err(e) => {
                        errs.push(format!("{n}: {e}"));
                        continue;
                    }
                };
                let syms = unsafe {
                    (|| -> std::result::Result<_, libloading::Error> {
                        Ok((
                            *lib.get::<Create>(b"nvrtcCreateProgram\0")?,
                            *lib.get::<Compile>(b"nvrtcCompileProgram\0")?,
                            *lib.get::<Size>(b"nvrtcGetProgramLogSize\0")?,
                            *lib.get::<Get>(b"nvrtcGetProgramLog\0")?,
                            *lib.get::<Size>(b"nvrtcGetPTXSize\0")?,
                            *lib.get::<Get>(b"nvrtcGetPTX\0")?,
                            *lib.get::<Destroy>(b"nvrtcDestroyProgram\0")?,
                        ))
                    })()
                };
                match syms {
                    Ok((create, compile, log_size, log, ptx_size, ptx, destroy)) => {
                        return Ok(Lib {
                            _lib: lib,
                            create,
                            compile,
                            log_size,
                            log,
                            ptx_size,
                            ptx,
                            destroy,
                        })
                    }
                    Err(e) => errs.push(format!("{n}: {e}")),
                }
            }
            Err(errs.join("; "))
        });
        match r {
            Ok(l) => Ok(l),
            Err(e) => bail!("NVRTC (libnvrtc) not found: {e}"),
        }
    }

    fn check(what: &str, st: i32) -> Result<()> {
        if st != 0 {
            bail!("NVRTC {what}: status {st}");
        }
        Ok(())
    }

    /// PTX of `src` compiled with `flags`; a compile error carries NVRTC's log.
    pub fn compile(src: &str, flags: &[String], name: &str) -> Result<Ptx> {
        let lib = load()?;
        let csrc = CString::new(src)?;
        let cname = CString::new(format!("{name}.cu"))?;
        let cflags: Vec<CString> = flags
            .iter()
            .map(|f| CString::new(f.as_str()))
            .collect::<std::result::Result<_, _>>()?;
        let ptrs: Vec<*const c_char> = cflags.iter().map(|c| c.as_ptr()).collect();
        let mut prog: Prog = std::ptr::null_mut();
        unsafe {
            check(
                "create",
                (lib.create)(
                    &mut prog,
                    csrc.as_ptr(),
                    cname.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                ),
            )?;
            let st = (lib.compile)(prog, ptrs.len() as i32, ptrs.as_ptr());
            if st != 0 {
                let mut n = 0usize;
                (lib.log_size)(prog, &mut n);
                let mut buf = vec![0u8; n.max(1)];
                (lib.log)(prog, buf.as_mut_ptr() as *mut c_char);
                (lib.destroy)(&mut prog);
                let log = String::from_utf8_lossy(&buf)
                    .trim_end_matches('\0')
                    .to_string();
                bail!("kernels/{name}.cu does not compile (status {st}): {log}");
            }
            let mut n = 0usize;
            check("ptx size", (lib.ptx_size)(prog, &mut n))?;
            let mut buf = vec![0u8; n.max(1)];
            check("ptx", (lib.ptx)(prog, buf.as_mut_ptr() as *mut c_char))?;
            (lib.destroy)(&mut prog);
            let text = String::from_utf8_lossy(&buf)
                .trim_end_matches('\0')
                .to_string();
            Ok(Ptx::from_src(text))
        }
    }
}

/// The virtual architecture NVRTC targets for a compute capability (PTX is JIT-compiled by the
/// driver for the exact chip). bf16 conversions need compute_80 or newer.
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (9, _) => "compute_90",
        (8, 9) => "compute_89",
        (8, 7) => "compute_87",
        (8, 6) => "compute_86",
        (8, 0) => "compute_80",
        (m, _) if m >= 10 => "compute_90",
        (m, n) => bail!("compute capability {m}.{n} is below 8.0 (bf16 kernels need sm_80+)"),
    })
}

/// A device sweep's results, still on the device.
pub struct DevSweep {
    pub codes: CudaSlice<i8>,
    pub dyn_scales: CudaSlice<f32>,
    pub dyn_zeros: CudaSlice<i32>,
    pub loss: CudaSlice<f64>,
    pub damp: f64,
}

/// The six cuSOLVER entry points we use, loaded by hand: they exist unchanged in cuSOLVER 11,
/// 12 and 13, while cudarc's binding of one version wants all of that version's symbols.
mod sol {
    use anyhow::{bail, Result};
    use std::ffi::c_void;
    pub type Handle = *mut c_void;
    pub const LOWER: i32 = 0; // CUBLAS_FILL_MODE_LOWER
    type Create = unsafe extern "C" fn(*mut Handle) -> i32;
    type Destroy = unsafe extern "C" fn(Handle) -> i32;
    type SetStream = unsafe extern "C" fn(Handle, *mut c_void) -> i32;
    type BufSize = unsafe extern "C" fn(Handle, i32, i32, *mut f64, i32, *mut i32) -> i32;
    type Factor =
        unsafe extern "C" fn(Handle, i32, i32, *mut f64, i32, *mut f64, i32, *mut i32) -> i32;
    pub struct Lib {
        _lib: libloading::Library,
        pub create: Create,
        pub destroy: Destroy,
        pub set_stream: SetStream,
        pub potrf_buffer: BufSize,
        pub potrf: Factor,
        pub potri_buffer: BufSize,
        pub potri: Factor,
    }
    impl Lib {
        pub fn load() -> Result<Lib> {
            let names = [
                "libcusolver.so",
                "libcusolver.so.13",
                "libcusolver.so.12",
                "libcusolver.so.11",
            ];
            let mut errs = Vec::new();
            for n in names {
                match unsafe { libloading::Library::new(n) } {
                    Ok(lib) => unsafe {
                        let create = *lib.get::<Create>(b"cusolverDnCreate\0")?;
                        let destroy = *lib.get::<Destroy>(b"cusolverDnDestroy\0")?;
                        let set_stream = *lib.get::<SetStream>(b"cusolverDnSetStream\0")?;
                        let potrf_buffer = *lib.get::<BufSize>(b"cusolverDnDpotrf_bufferSize\0")?;
                        let potrf = *lib.get::<Factor>(b"cusolverDnDpotrf\0")?;
                        let potri_buffer = *lib.get::<BufSize>(b"cusolverDnDpotri_bufferSize\0")?;
                        let potri = *lib.get::<Factor>(b"cusolverDnDpotri\0")?;
                        return Ok(Lib {
                            _lib: lib,
                            create,
                            destroy,
                            set_stream,
                            potrf_buffer,
                            potrf,
                            potri_buffer,
                            potri,
                        });
                    },
                    Err(e) => errs.push(format!("{n}: {e}")),
                }
            }
            bail!("cuSOLVER (libcusolver) not found: {}", errs.join("; "))
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

fn check_sol(what: &str, s: i32) -> Result<()> {
    if s != 0 {
        bail!("cuSOLVER {what}: status {s}");
    }
    Ok(())
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

    /// RTN with the min/max observer over groups of `gs` columns (channel: gs = cols); the
    /// same integers and scales as `quant::quantize_rtn`. Returns (codes, scales, zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn rtn(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        gs: usize,
        bits: u32,
        sym: bool,
        dtype: i32,
    ) -> Result<(Vec<i8>, Vec<f32>, Vec<i32>)> {
        let ng = cols / gs;
        let s = &self.stream;
        let dw = s.memcpy_stod(w)?;
        let mut codes = s.alloc_zeros::<i8>(rows * cols)?;
        let mut scales = s.alloc_zeros::<f32>(rows * ng)?;
        let mut zeros = s.alloc_zeros::<i32>(rows * ng)?;
        let f = self.f(&self.quant, "rtn_quantize")?;
        let (r, c, g, b, sy) = (rows as i32, cols as i32, gs as i32, bits as i32, sym as i32);
        let mut l = s.launch_builder(&f);
        l.arg(&dw)
            .arg(&r)
            .arg(&c)
            .arg(&g)
            .arg(&b)
            .arg(&sy)
            .arg(&dtype)
            .arg(&mut codes)
            .arg(&mut scales)
            .arg(&mut zeros);
        unsafe { l.launch(blocks(rows * ng, 128)) }?;
        Ok((
            s.memcpy_dtov(&codes)?,
            s.memcpy_dtov(&scales)?,
            s.memcpy_dtov(&zeros)?,
        ))
    }

    /// U, the upper Cholesky factor of (H + λI)⁻¹ in f32 (row-major, upper triangle valid), with
    /// λ = damp · mean(diag H); damp grows ×10 up to 1 while a factorization fails, as
    /// `sweep::Factor::new`. `h` is the n×n f64 Hessian on the device (symmetric, kept).
    /// Returns (U, damp used).
    pub fn inverse_upper_cholesky(
        &self,
        h: &CudaSlice<f64>,
        n: usize,
        damp: f64,
    ) -> Result<(CudaSlice<f32>, f64)> {
        let s = &self.stream;
        let ni = n as i32;
        let mut diag = s.alloc_zeros::<f64>(n)?;
        let gd = self.f(&self.util, "get_diag_f64")?;
        let mut l = s.launch_builder(&gd);
        l.arg(h).arg(&ni).arg(&mut diag);
        unsafe { l.launch(blocks(n, 256)) }?;
        let mean_diag = s.memcpy_dtov(&diag)?.iter().sum::<f64>() / n as f64;
        let add = self.f(&self.util, "add_diag_f64")?;
        let mut used = damp;
        loop {
            let mut a = s.clone_dtod(h)?;
            let lambda = used * mean_diag;
            let mut l = s.launch_builder(&add);
            l.arg(&mut a).arg(&ni).arg(&lambda);
            unsafe { l.launch(blocks(n, 256)) }?;
            if self.potrf_potri_potrf(&mut a, n)? {
                let mut u = s.alloc_zeros::<f32>(n * n)?;
                let conv = self.f(&self.util, "f64_to_f32")?;
                let nn = (n * n) as i64;
                let mut l = s.launch_builder(&conv);
                l.arg(&a).arg(&mut u).arg(&nn);
                unsafe { l.launch(blocks(n * n, 256)) }?;
                return Ok((u, used));
            }
            if used >= 1.0 {
                bail!("H is not positive definite even with damp {used}");
            }
            used = (used * 10.0).min(1.0);
        }
    }

    /// In place on a symmetric n×n f64 matrix A: L = chol(A) (lower, column-major), A⁻¹ from L
    /// (potri), L' = chol(A⁻¹). Read row-major, the buffer's upper triangle is then L'ᵀ = U with
    /// A⁻¹ = UᵀU. Returns false when a factorization finds the matrix not positive definite.
    fn potrf_potri_potrf(&self, a: &mut CudaSlice<f64>, n: usize) -> Result<bool> {
        let s = &self.stream;
        self.ctx.bind_to_thread()?;
        let lower = sol::LOWER;
        let ni = n as i32;
        let mut info = s.alloc_zeros::<i32>(1)?;
        // One stream only: the guards' event bookkeeping is not needed past taking the pointers.
        let ap = {
            let (p, _g) = a.device_ptr_mut(s);
            p as *mut f64
        };
        let ip = {
            let (p, _g) = info.device_ptr_mut(s);
            p as *mut i32
        };
        let mut lw_f = 0i32;
        let mut lw_i = 0i32;
        unsafe {
            check_sol(
                "potrf buffer",
                (self.sol.potrf_buffer)(self.solver, lower, ni, ap, ni, &mut lw_f),
            )?;
            check_sol(
                "potri buffer",
                (self.sol.potri_buffer)(self.solver, lower, ni, ap, ni, &mut lw_i),
            )?;
        }
        let lw = lw_f.max(lw_i).max(1);
        let mut work = s.alloc_zeros::<f64>(lw as usize)?;
        let wp = {
            let (p, _g) = work.device_ptr_mut(s);
            p as *mut f64
        };
        for (step, potri) in [("potrf(H)", false), ("potri", true), ("potrf(H⁻¹)", false)] {
            let st = unsafe {
                if potri {
                    (self.sol.potri)(self.solver, lower, ni, ap, ni, wp, lw, ip)
                } else {
                    (self.sol.potrf)(self.solver, lower, ni, ap, ni, wp, lw, ip)
                }
            };
            check_sol(step, st)?;
            let h = s.memcpy_dtov(&info)?;
            if h[0] != 0 {
                return Ok(false);
            }
        }
        drop(work);
        Ok(true)
    }

    /// GPTQ's column sweep (see `passes/sweep.rs`) for a job on the host: upload, factor,
    /// sweep, download.
    pub fn gptq_sweep(&self, job: &SweepJob) -> Result<SweepOut> {
        let s = &self.stream;
        let h = s.memcpy_stod(job.h)?;
        let mut w = s.memcpy_stod(job.w)?;
        let fixed = match &job.fixed {
            Some(f) => Some((
                s.memcpy_stod(f.scales)?,
                s.memcpy_stod(f.zeros)?,
                s.memcpy_stod(f.gcol)?,
            )),
            None => None,
        };
        let d = self.gptq_sweep_dev(&mut w, &h, job, fixed.as_ref())?;
        Ok(SweepOut {
            codes: s.memcpy_dtov(&d.codes)?,
            dyn_scales: s.memcpy_dtov(&d.dyn_scales)?,
            dyn_zeros: s.memcpy_dtov(&d.dyn_zeros)?,
            loss: s.memcpy_dtov(&d.loss)?,
            damp: d.damp,
        })
    }

    /// The sweep on device-resident weights `w` (processing order; left holding the fixed
    /// values) and Hessian `h`: U on the device (cuSOLVER), then per block of columns the
    /// `gptq_block` kernel and the lazy batch update as one SGEMM. The shape and parameters are
    /// `job`'s (its host slices are not read).
    pub fn gptq_sweep_dev(
        &self,
        w: &mut CudaSlice<f32>,
        h: &CudaSlice<f64>,
        job: &SweepJob,
        fixed: Option<&(CudaSlice<f32>, CudaSlice<i32>, CudaSlice<i32>)>,
    ) -> Result<DevSweep> {
        let (rows, cols) = (job.rows, job.cols);
        let s = &self.stream;
        let (u, damp) = self.inverse_upper_cholesky(h, cols, job.damp)?;
        let ng = job.n_groups;
        // absent fixed parameters: one-element placeholders the kernel never reads
        let placeholder;
        let (fs, fz, gcol, has_fixed) = match fixed {
            Some((a, b, c)) => (a, b, c, 1i32),
            None => {
                placeholder = (
                    s.alloc_zeros::<f32>(1)?,
                    s.alloc_zeros::<i32>(1)?,
                    s.alloc_zeros::<i32>(1)?,
                );
                (&placeholder.0, &placeholder.1, &placeholder.2, 0i32)
            }
        };
        let mut codes = s.alloc_zeros::<i8>(rows * cols)?;
        let mut dyn_s = s.alloc_zeros::<f32>(rows * ng)?;
        let mut dyn_z = s.alloc_zeros::<i32>(rows * ng)?;
        let bs = job.block_size.min(cols);
        let mut e = s.alloc_zeros::<f32>(rows * bs)?;
        let mut loss = s.alloc_zeros::<f64>(rows)?;
        let f = self.f(&self.quant, "gptq_block")?;
        // the block's weights in shared memory: bs floats per thread, within 48 KiB
        let threads: u32 = if bs * 4 * 64 <= 48 * 1024 { 64 } else { 32 };
        if bs * 4 * threads as usize > 48 * 1024 {
            bail!("block_size {bs} is too large for the GPU sweep (at most 384)");
        }
        let mut i1 = 0usize;
        while i1 < cols {
            let i2 = (i1 + bs).min(cols);
            let bw = i2 - i1;
            let cfg = LaunchConfig {
                grid_dim: ((rows as u32).div_ceil(threads), 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: (bw * threads as usize * 4) as u32,
            };
            let a = [
                rows as i32,
                cols as i32,
                i1 as i32,
                i2 as i32,
                job.gs as i32,
                job.bits as i32,
                job.sym as i32,
                job.scale_dtype,
            ];
            let ngi = ng as i32;
            let mut l = s.launch_builder(&f);
            l.arg(&mut *w).arg(&u);
            for v in &a {
                l.arg(v);
            }
            l.arg(fs)
                .arg(fz)
                .arg(gcol)
                .arg(&ngi)
                .arg(&has_fixed)
                .arg(&mut codes)
                .arg(&mut dyn_s)
                .arg(&mut dyn_z)
                .arg(&mut e)
                .arg(&mut loss);
            unsafe { l.launch(cfg) }?;
            if i2 < cols {
                // Row-major W[rows, cols] is column-major Wᵀ; in those terms
                // Wᵀ[i2.., :] −= U[i1..i2, i2..]ᵀ · Eᵀ, with U's block read column-major
                // (ld = cols) and E [rows, bw] column-major as [bw, rows].
                let cfg = GemmConfig {
                    transa: cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                    transb: cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                    m: (cols - i2) as i32,
                    n: rows as i32,
                    k: bw as i32,
                    alpha: -1.0f32,
                    lda: cols as i32,
                    ldb: bw as i32,
                    beta: 1.0f32,
                    ldc: cols as i32,
                };
                let a_view = u.slice(i1 * cols + i2..);
                let b_view = e.slice(..rows * bw);
                let mut c_view = w.slice_mut(i2..);
                unsafe { self.blas.gemm(cfg, &a_view, &b_view, &mut c_view) }?;
            }
            i1 = i2;
        }
        s.synchronize()?;
        Ok(DevSweep {
            codes,
            dyn_scales: dyn_s,
            dyn_zeros: dyn_z,
            loss,
            damp,
        })
    }

    /// XᵀX [d, d] of X [n, d] f32 on the device (SGEMM, f32 arithmetic), to the host: one
    /// batch's Hessian statistic (`model::ops::gram` on the CPU).
    pub fn gram(&self, x: &CudaSlice<f32>, n: usize, d: usize) -> Result<Vec<f32>> {
        let s = &self.stream;
        let mut g = s.alloc_zeros::<f32>(d * d)?;
        // column-major: X is [d, n] (ld d); G = X · Xᵀ (symmetric, so row-major alike)
        let cfg = GemmConfig {
            transa: cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            transb: cublas_sys::cublasOperation_t::CUBLAS_OP_T,
            m: d as i32,
            n: d as i32,
            k: n as i32,
            alpha: 1.0f32,
            lda: d as i32,
            ldb: d as i32,
            beta: 0.0f32,
            ldc: d as i32,
        };
        unsafe { self.blas.gemm(cfg, x, x, &mut g) }?;
        Ok(s.memcpy_dtov(&g)?)
    }

    /// H += XᵀX for X [n, d] in bf16 (raw bits), accumulated in f32 by cuBLAS (tensor cores,
    /// f32 accumulation). `h` is d×d f32, symmetric.
    pub fn xtx_bf16(
        &self,
        x: &CudaSlice<u16>,
        n: usize,
        d: usize,
        h: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = &self.stream;
        let (xp, _gx) = x.device_ptr(s);
        let (hp, _gh) = h.device_ptr_mut(s);
        // column-major: X is [d, n] (ld d); H = X · Xᵀ  (d×d)
        self.gemm_bf16(
            (false, true),
            (d, d, n),
            (xp, d),
            (xp, d),
            (hp, d, cublas_sys::cudaDataType_t::CUDA_R_32F),
            1.0,
        )
    }

    /// C [m, n] = A [m, k] · B [n, k]ᵀ, all bf16 (raw bits) row-major, f32 accumulation: the
    /// shape of a linear layer's forward (X · Wᵀ).
    pub fn linear_bf16(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        y: &mut CudaSlice<u16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let s = &self.stream;
        let (xp, _gx) = x.device_ptr(s);
        let (wp, _gw) = w.device_ptr(s);
        let (yp, _gy) = y.device_ptr_mut(s);
        // column-major: Yᵀ [n, m] = W [n, k] (stored as Wᵀ col-major → op T) · Xᵀ [k, m]
        self.gemm_bf16(
            (true, false),
            (n, m, k),
            (wp, k),
            (xp, k),
            (yp, n, cublas_sys::cudaDataType_t::CUDA_R_16BF),
            0.0,
        )
    }

    /// Column-major C = op(A) · op(B) + beta·C through cublasGemmEx: A and B bf16 (raw bits),
    /// C of `c.2`'s type, f32 accumulation. `trans` = (op(A) is Aᵀ, op(B) is Bᵀ), `mnk` the
    /// product's shape, each operand (pointer, leading dimension).
    #[allow(clippy::type_complexity)]
    fn gemm_bf16(
        &self,
        trans: (bool, bool),
        mnk: (usize, usize, usize),
        a: (cudarc::driver::sys::CUdeviceptr, usize),
        b: (cudarc::driver::sys::CUdeviceptr, usize),
        c: (
            cudarc::driver::sys::CUdeviceptr,
            usize,
            cublas_sys::cudaDataType_t,
        ),
        beta: f32,
    ) -> Result<()> {
        use cublas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let bf16 = cublas_sys::cudaDataType_t::CUDA_R_16BF;
        let alpha = 1.0f32;
        self.ctx.bind_to_thread()?;
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(trans.0),
                op(trans.1),
                mnk.0 as i32,
                mnk.1 as i32,
                mnk.2 as i32,
                &alpha as *const f32 as *const _,
                a.0 as *const _,
                bf16,
                a.1 as i32,
                b.0 as *const _,
                bf16,
                b.1 as i32,
                &beta as *const f32 as *const _,
                c.0 as *mut _,
                c.2,
                c.1 as i32,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// Deterministic uniform bf16 values in [−scale, scale) (SplitMix64 on the index).
    pub fn random_bf16(&self, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<u16>> {
        let s = &self.stream;
        let mut out = s.alloc_zeros::<u16>(n)?;
        let f = self.f(&self.util, "fill_uniform_bf16")?;
        let nn = n as i64;
        let mut l = s.launch_builder(&f);
        l.arg(&mut out).arg(&nn).arg(&seed).arg(&scale);
        unsafe { l.launch(blocks(n, 256)) }?;
        Ok(out)
    }

    /// bf16 (raw bits) → f32 on the device.
    pub fn bf16_to_f32(&self, x: &CudaSlice<u16>) -> Result<CudaSlice<f32>> {
        let s = &self.stream;
        let mut out = s.alloc_zeros::<f32>(x.len())?;
        let f = self.f(&self.util, "bf16_to_f32")?;
        let nn = x.len() as i64;
        let mut l = s.launch_builder(&f);
        l.arg(x).arg(&mut out).arg(&nn);
        unsafe { l.launch(blocks(x.len(), 256)) }?;
        Ok(out)
    }

    /// 2/n · ΣXᵀX (f32) → f64 on the device: the GPTQ Hessian.
    pub fn hessian_f64(&self, h: &CudaSlice<f32>, n_tokens: usize) -> Result<CudaSlice<f64>> {
        let s = &self.stream;
        let mut out = s.alloc_zeros::<f64>(h.len())?;
        let f = self.f(&self.util, "scale_f32_to_f64")?;
        let nn = h.len() as i64;
        let alpha = 2.0 / n_tokens as f64;
        let mut l = s.launch_builder(&f);
        l.arg(h).arg(&mut out).arg(&nn).arg(&alpha);
        unsafe { l.launch(blocks(h.len(), 256)) }?;
        Ok(out)
    }

    /// Codes, scales, zero points (and g_idx) back to f32 weights on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn dequantize(
        &self,
        codes: &[i8],
        scales: &[f32],
        zeros: Option<&[i32]>,
        g_idx: Option<&[i32]>,
        rows: usize,
        cols: usize,
        gs: usize,
    ) -> Result<Vec<f32>> {
        let s = &self.stream;
        let ng = scales.len() / rows;
        let dc = s.memcpy_stod(codes)?;
        let ds = s.memcpy_stod(scales)?;
        // absent zeros / g_idx: one-element placeholders the kernel never reads
        let dz = match zeros {
            Some(z) => s.memcpy_stod(z)?,
            None => s.alloc_zeros::<i32>(1)?,
        };
        let dg = match g_idx {
            Some(g) => s.memcpy_stod(g)?,
            None => s.alloc_zeros::<i32>(1)?,
        };
        let mut out = s.alloc_zeros::<f32>(rows * cols)?;
        let f = self.f(&self.quant, "dequantize")?;
        let a = [
            rows as i32,
            cols as i32,
            gs as i32,
            ng as i32,
            zeros.is_some() as i32,
            g_idx.is_some() as i32,
        ];
        let mut l = s.launch_builder(&f);
        l.arg(&dc).arg(&ds).arg(&dz).arg(&dg);
        for v in &a {
            l.arg(v);
        }
        l.arg(&mut out);
        unsafe { l.launch(blocks(rows * cols, 256)) }?;
        Ok(s.memcpy_dtov(&out)?)
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}
