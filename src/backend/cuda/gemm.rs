//! cuBLAS products on the device: the f32 Gram matrix XᵀX and the bf16 products with f32
//! accumulation (Hessian sums, a linear layer's forward) through cublasGemmEx.

use super::Gpu;
use anyhow::Result;
use cudarc::cublas::sys as cublas_sys;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

impl Gpu {
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
}
