//! Elementwise kernels of kernels/util.cu: seeded random bf16 fills, bf16 → f32, and the
//! f32 Hessian sum scaled to f64.

use super::{blocks, Gpu};
use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

impl Gpu {
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
}
