// Quantization kernels: RTN group quantization and the GPTQ column-block sweep.
//
// Compiled at run time by NVRTC (src/backend/cuda/) with --fmad=false, so every f32 operation
// is a single IEEE-rounded operation in the order written here, the order of the CPU code in
// src/quant/mod.rs (RTN is bit-identical with it) and src/passes/sweep.rs + gptq.rs (GPTQ).
// No headers: bf16/f16 rounding is one PTX cvt instruction each.
//
// Conventions shared with the CPU code:
//   dtype: 0 = f32 (no rounding), 1 = bf16, 2 = f16 — the dtype whose rounding every op of the
//   reference (compressed-tensors on bf16/f16 tensors) applies; r(x) below.
//   Codes are signed in [qmin, qmax] = [-2^(b-1), 2^(b-1)-1]; zero points likewise.

#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2
#define F32_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float round_to(int dtype, float x) {
    if (dtype == DT_BF16) {
        unsigned short h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
        return __uint_as_float(((unsigned int)h) << 16);
    } else if (dtype == DT_F16) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
        float y;
        asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h));
        return y;
    }
    return x;
}

// torch.finfo(dtype).eps: what compressed-tensors puts in place of a zero scale.
__device__ __forceinline__ float dtype_eps(int dtype) {
    return dtype == DT_BF16 ? 0.0078125f : (dtype == DT_F16 ? 0.0009765625f : 1.1920929e-07f);
}

// compressed-tensors' calculate_qparams on an observed (min, max) — quant::minmax_params.
__device__ void minmax_params(float mn, float mx, int bits, int sym, int dtype, float* scale,
                              int* zero) {
    int qmin = -(1 << (bits - 1));
    int qmax = (1 << (bits - 1)) - 1;
    mn = fminf(mn, 0.0f);
    mx = fmaxf(mx, 0.0f);
    float bit_range = (float)(qmax - qmin);
    if (sym) {
        float max_pos = fmaxf(fabsf(mn), mx);
        float s = round_to(dtype, max_pos / (bit_range / 2.0f));
        if (s == 0.0f) s = dtype_eps(dtype);
        *scale = s;
        *zero = 0;
    } else {
        float s0 = round_to(dtype, round_to(dtype, mx - mn) / bit_range);
        int zp = 0;
        if (s0 != 0.0f) {
            float z = round_to(dtype, (float)qmin - round_to(dtype, mn / s0));
            z = fminf(fmaxf(z, (float)qmin), (float)qmax);
            zp = (int)rintf(z);
        }
        *scale = s0 == 0.0f ? dtype_eps(dtype) : s0;
        *zero = zp;
    }
}

// quant::quantize_value: clamp(round(r(r(w / scale) + zero)), qmin, qmax).
__device__ __forceinline__ int quantize_value(float w, float scale, int zero, int bits,
                                              int dtype) {
    float qmin = (float)(-(1 << (bits - 1)));
    float qmax = (float)((1 << (bits - 1)) - 1);
    float s = round_to(dtype, w / scale);
    if (zero != 0) s = round_to(dtype, s + (float)zero);
    return (int)rintf(fminf(fmaxf(s, qmin), qmax));
}

// RTN with the min/max observer, one thread per (row, group) — quant::quantize_rtn.
// w [rows, cols] f32 (values of the weight dtype); codes [rows, cols]; scales/zeros [rows, ng].
extern "C" __global__ void rtn_quantize(const float* __restrict__ w, int rows, int cols, int gs,
                                        int bits, int sym, int dtype, signed char* codes,
                                        float* scales, int* zeros) {
    int ng = cols / gs;
    long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long)rows * ng) return;
    int r = (int)(t / ng), g = (int)(t % ng);
    const float* v = w + (long)r * cols + (long)g * gs;
    float mn = F32_INF, mx = -F32_INF;
    for (int k = 0; k < gs; k++) {
        mn = fminf(mn, v[k]);
        mx = fmaxf(mx, v[k]);
    }
    float s;
    int z;
    minmax_params(mn, mx, bits, sym, dtype, &s, &z);
    scales[t] = s;
    zeros[t] = z;
    signed char* c = codes + (long)r * cols + (long)g * gs;
    for (int k = 0; k < gs; k++) c[k] = (signed char)quantize_value(v[k], s, z, bits, dtype);
}

// One block of GPTQ's column sweep (GPTQ Algorithm 1 / eq. 3; sweep.rs), one thread per row.
//
// For columns i in [i1, i2) of row r (processing order):
//   group boundary (dynamic groups): (s, z) = minmax over the row's current w[i, i+gs)
//   q = quantize(w_i); fixed = r_scale((q − z)·s); e = (w_i − fixed) / U_ii
//   w_{i+1..i2} −= e · U[i, i+1..i2];  E[r, i − i1] = e
// The block's weights live in shared memory, column-major per thread (bank-conflict free);
// columns at and past i2 stay in global memory, updated afterwards by one GEMM
// (W[:, i2:] −= E · U[i1:i2, i2:], the paper's lazy batch update) exactly as the CPU sweep.
//
// fixed_s/fixed_z: when has_fixed, per-(row, group) parameters fixed in advance (channel
// strategy, static groups): index r * ng + gcol[i] (gcol: the group of processing column i).
// w [rows, cols] f32, u [cols, cols] f32 row-major upper, codes [rows, cols] (processing order),
// dyn_s/dyn_z [rows, ng] written at dynamic group boundaries, e_out [rows, i2 − i1], loss [rows].
extern "C" __global__ void gptq_block(float* __restrict__ w, const float* __restrict__ u,
                                      int rows, int cols, int i1, int i2, int gs, int bits,
                                      int sym, int scale_dtype, const float* __restrict__ fixed_s,
                                      const int* __restrict__ fixed_z,
                                      const int* __restrict__ gcol, int ng, int has_fixed,
                                      signed char* codes,
                                      float* dyn_s, int* dyn_z, float* e_out, double* loss) {
    extern __shared__ float sh[];  // [i2 - i1][blockDim.x]
    int tid = threadIdx.x;
    int r = blockIdx.x * blockDim.x + tid;
    int nt = blockDim.x;
    int bw = i2 - i1;
    bool live = r < rows;
    float* wr = w + (long)(live ? r : 0) * cols;
    if (live)
        for (int k = 0; k < bw; k++) sh[k * nt + tid] = wr[i1 + k];
    if (!live) return;
    float s = 1.0f;
    int z = 0;
    double l = 0.0;
    for (int i = i1; i < i2; i++) {
        if (has_fixed) {
            long p = (long)r * ng + gcol[i];
            s = fixed_s[p];
            z = fixed_z[p];
        } else if (i % gs == 0) {
            float mn = F32_INF, mx = -F32_INF;
            for (int k = i; k < i + gs; k++) {
                float v = k < i2 ? sh[(k - i1) * nt + tid] : wr[k];
                mn = fminf(mn, v);
                mx = fmaxf(mx, v);
            }
            minmax_params(mn, mx, bits, sym, scale_dtype, &s, &z);
            dyn_s[(long)r * ng + i / gs] = s;
            dyn_z[(long)r * ng + i / gs] = z;
        }
        float x = sh[(i - i1) * nt + tid];
        // the working weights are f32: w / scale in f32 (GPTQ_PRECISION), as Grid::column
        int q = quantize_value(x, s, z, bits, DT_F32);
        codes[(long)r * cols + i] = (signed char)q;
        float fixed = round_to(scale_dtype, (float)(q - z) * s);
        float e = (x - fixed) / u[(long)i * cols + i];
        l += (double)e * (double)e;
        sh[(i - i1) * nt + tid] = fixed;
        const float* urow = u + (long)i * cols;
        for (int k = i + 1; k < i2; k++) sh[(k - i1) * nt + tid] -= e * urow[k];
        e_out[(long)r * bw + (i - i1)] = e;
    }
    for (int k = 0; k < bw; k++) wr[i1 + k] = sh[k * nt + tid];
    loss[r] += l;
}

// (q − z)·s per (row, group) back to f32 — dequantize-on-the-fly for eval of packed weights
// (QuantizedLinear::dequantize with groups in column order or through g_idx).
extern "C" __global__ void dequantize(const signed char* __restrict__ codes,
                                      const float* __restrict__ scales,
                                      const int* __restrict__ zeros, const int* __restrict__ g_idx,
                                      int rows, int cols, int gs, int ng, int has_zeros,
                                      int has_gidx, float* out) {
    long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long)rows * cols) return;
    int r = (int)(t / cols), j = (int)(t % cols);
    int g = has_gidx ? g_idx[j] : j / gs;
    long p = (long)r * ng + g;
    int z = has_zeros ? zeros[p] : 0;
    out[t] = (float)((int)codes[t] - z) * scales[p];
}
