//! Quantization primitives on the device: RTN, the GPTQ column sweep (kernels/quant.cu with
//! SGEMM lazy updates) and dequantization back to f32 weights.

use super::{blocks, Gpu};
use crate::backend::{SweepJob, SweepOut};
use anyhow::{bail, Result};
use cudarc::cublas::sys as cublas_sys;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// A device sweep's results, still on the device.
pub struct DevSweep {
    pub codes: CudaSlice<i8>,
    pub dyn_scales: CudaSlice<f32>,
    pub dyn_zeros: CudaSlice<i32>,
    pub loss: CudaSlice<f64>,
    pub damp: f64,
}

impl Gpu {
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
}
