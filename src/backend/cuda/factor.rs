//! The inverse Hessian's upper Cholesky factor on the device (cuSOLVER potrf / potri in f64,
//! with GPTQ's growing damp), as the GPTQ sweep needs it.

use super::sol::{self, check_sol};
use super::{blocks, Gpu};
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, DevicePtrMut, PushKernelArg};

impl Gpu {
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
}
