//! Execution backends. The CPU path (candle's CPU tensors, rayon, faer) is always built; the
//! CUDA path (cudarc with dynamic loading, kernels from `kernels/*.cu` compiled by NVRTC at run
//! time) is behind the `cuda` cargo feature.

/// Whether a CUDA device can be used in this build and on this machine.
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        cudarc::driver::CudaContext::new(0).is_ok()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}
