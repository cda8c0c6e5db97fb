// The decoder layer's non-GEMM steps (src/model/ops.rs and attention.rs are the CPU twins):
// RMSNorm, RoPE (rotate-half) with the [b, t, h, hd] → [b, h, t, hd] transpose, causal GQA
// attention with softmax, SiLU·mul, bias and residual adds. The products are cuBLAS's.
// Compiled at run time by NVRTC (src/backend/cuda_layer.rs).

#define NEG_INF __int_as_float(0xff800000)

// One block per row of width d: y = g · (x · 1/sqrt(mean(x²) + eps)), mean accumulated in f64.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ g,
                                    float* y, int d, float eps) {
    __shared__ double part[256];
    const float* xr = x + (long)blockIdx.x * d;
    float* yr = y + (long)blockIdx.x * d;
    double s = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += (double)xr[i] * (double)xr[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    float ms = (float)(part[0] / (double)d);
    float r = 1.0f / sqrtf(ms + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = g[i] * (xr[i] * r);
}

// x [b, t, h, hd] → y [b, h, t, hd], rotated by the RoPE tables cos/sin [max_t, hd/2] when
// `rotate`, else only transposed. One thread per (b, t, h, i < hd/2).
extern "C" __global__ void rope_transpose(const float* __restrict__ x, float* y,
                                          const float* __restrict__ cs,
                                          const float* __restrict__ sn, int b, int t, int h,
                                          int hd, int rotate) {
    int half = hd / 2;
    long n = (long)b * t * h * half;
    long k = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    int i = (int)(k % half);
    long r = k / half;
    int hi = (int)(r % h);
    r /= h;
    int ti = (int)(r % t);
    int bi = (int)(r / t);
    const float* src = x + (((long)bi * t + ti) * h + hi) * hd;
    float* dst = y + (((long)bi * h + hi) * t + ti) * hd;
    float x1 = src[i], x2 = src[i + half];
    if (rotate) {
        float c = cs[ti * half + i], s = sn[ti * half + i];
        dst[i] = x1 * c - x2 * s;
        dst[i + half] = x2 * c + x1 * s;
    } else {
        dst[i] = x1;
        dst[i + half] = x2;
    }
}

// Causal attention with grouped KV heads. q [b, nh, t, hd], k/v [b, nkv, t, hd] → o [b, t, nh,
// hd]. One block per (b, head, query i); scores for keys 0..=i live in shared memory (t floats).
// Softmax as the CPU: exp(s − max), terms below e^-30 flushed to zero, normalised by the sum.
extern "C" __global__ void causal_attention(const float* __restrict__ q,
                                            const float* __restrict__ k,
                                            const float* __restrict__ v, float* o, int b, int nh,
                                            int nkv, int t, int hd, float scale) {
    extern __shared__ float sc[];  // [t] scores, then [blockDim.x] reduction scratch
    float* red = sc + t;
    int i = blockIdx.x % t;
    int bh = blockIdx.x / t;
    int bi = bh / nh, hh = bh % nh;
    int g = hh / (nh / nkv);
    const float* qi = q + (((long)bi * nh + hh) * t + i) * hd;
    const float* kh = k + ((long)bi * nkv + g) * t * hd;
    const float* vh = v + ((long)bi * nkv + g) * t * hd;
    int tid = threadIdx.x, nt = blockDim.x;
    float mx = NEG_INF;
    for (int j = tid; j <= i; j += nt) {
        const float* kj = kh + (long)j * hd;
        float s = 0.0f;
        for (int c = 0; c < hd; c++) s += qi[c] * kj[c];
        s *= scale;
        sc[j] = s;
        mx = fmaxf(mx, s);
    }
    red[tid] = mx;
    __syncthreads();
    for (int w = nt / 2; w > 0; w >>= 1) {
        if (tid < w) red[tid] = fmaxf(red[tid], red[tid + w]);
        __syncthreads();
    }
    mx = red[0];
    __syncthreads();
    float sum = 0.0f;
    for (int j = tid; j <= i; j += nt) {
        float dd = sc[j] - mx;
        float e = dd < -30.0f ? 0.0f : expf(dd);
        sc[j] = e;
        sum += e;
    }
    red[tid] = sum;
    __syncthreads();
    for (int w = nt / 2; w > 0; w >>= 1) {
        if (tid < w) red[tid] += red[tid + w];
        __syncthreads();
    }
    float inv = 1.0f / red[0];
    float* oi = o + (((long)bi * t + i) * nh + hh) * hd;
    for (int c = tid; c < hd; c += nt) {
        float acc = 0.0f;
        for (int j = 0; j <= i; j++) acc += (sc[j] * inv) * vh[(long)j * hd + c];
        oi[c] = acc;
    }
}

// y = silu(g) · u = g / (1 + e^{−g}) · u.
extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u,
                                    float* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

// x[r, c] += bias[c] for x [rows, d].
extern "C" __global__ void add_bias(float* x, const float* __restrict__ bias, long n, int d) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += bias[i % d];
}

// x += y.
extern "C" __global__ void add_assign(float* x, const float* __restrict__ y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}
