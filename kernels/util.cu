// Small helper kernels: dampening, precision conversion, and deterministic random fills for
// the GPU benchmark (src/backend/cuda/). Compiled at run time by NVRTC.

// A[j, j] += lambda for a row-major (or column-major: symmetric) n×n f64 matrix.
extern "C" __global__ void add_diag_f64(double* a, int n, double lambda) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) a[(long)j * n + j] += lambda;
}

extern "C" __global__ void get_diag_f64(const double* __restrict__ a, int n, double* out) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) out[j] = a[(long)j * n + j];
}

extern "C" __global__ void f64_to_f32(const double* __restrict__ in, float* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)in[i];
}

extern "C" __global__ void f32_to_f64(const float* __restrict__ in, double* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (double)in[i];
}

// out[i] = alpha * in[i] (f32 → f64), for H = 2/n · XᵀX.
extern "C" __global__ void scale_f32_to_f64(const float* __restrict__ in, double* out, long n,
                                            double alpha) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = alpha * (double)in[i];
}

// SplitMix64: a counter-based generator, so the fill is the same for any launch shape.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Uniform in [-scale, scale), rounded to bf16 (stored as raw u16 bits).
extern "C" __global__ void fill_uniform_bf16(unsigned short* out, long n, unsigned long long seed,
                                             float scale) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long r = splitmix64(seed ^ ((unsigned long long)i * 0xD1B54A32D192ED03ull));
    float u = (float)(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    float x = (2.0f * u - 1.0f) * scale;
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    out[i] = h;
}

// bf16 (raw bits) → f32.
extern "C" __global__ void bf16_to_f32(const unsigned short* __restrict__ in, float* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __uint_as_float(((unsigned int)in[i]) << 16);
}
