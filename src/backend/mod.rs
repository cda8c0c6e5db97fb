//! Execution backends. The CPU path (faer for GEMM and factorizations, our kernels in
//! `model/ops.rs` and `model/attention.rs`, rayon, ndarray for host matrices) is always built; the
//! CUDA path (cudarc with dynamic loading, kernels from `kernels/*.cu` compiled by NVRTC at run
//! time) is behind the `cuda` cargo feature.

/// Whether a CUDA device can be used in this build and on this machine.
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        // With dynamic loading, cudarc panics when libcuda is absent: treat that as "no GPU".
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let ok = std::panic::catch_unwind(|| cudarc::driver::CudaContext::new(0).is_ok())
            .unwrap_or(false);
        std::panic::set_hook(prev);
        ok
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}
