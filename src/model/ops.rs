//! The forward pass's numeric kernels on row-major f32 slices: GEMM (faer), RMSNorm, RoPE,
//! SiLU·mul, embedding lookup. Each is tested against a direct evaluation in `tests`.

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use std::cell::Cell;

thread_local! {
    /// Set while this thread runs one of several independent work items side by side
    /// ([`single_threaded`]): its GEMMs then run on it alone.
    static SINGLE_THREADED: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the GEMMs it calls on this thread alone, for a caller that already runs
/// independent work items in parallel (small calibration batches side by side: faer's
/// fork-join over two cores cost more than it gained on 256-wide products, ≈ 10% of a GPTQ run
/// in barriers). faer splits a product over its rows and columns, never its inner dimension,
/// so the results are bit for bit those of the parallel GEMM (`tests::gemm_bits_do_not_depend_on_threads`).
pub fn single_threaded<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SINGLE_THREADED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SINGLE_THREADED.with(|c| c.replace(true)));
    f()
}

/// The parallelism of this thread's GEMMs (see [`single_threaded`]).
fn gemm_par() -> Par {
    if SINGLE_THREADED.with(|c| c.get()) {
        Par::Seq
    } else {
        Par::rayon(0)
    }
}

/// y [n, out] = x [n, k] · wᵀ (w is [out, k], the PyTorch Linear layout), plus bias.
pub fn linear(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    out: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), out * k);
    let mut y = vec![0f32; n * out];
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut y, n, out),
        Accum::Replace,
        MatRef::from_row_major_slice(x, n, k),
        MatRef::from_row_major_slice(w, out, k).transpose(),
        1.0,
        gemm_par(),
    );
    if let Some(b) = bias {
        y.par_chunks_mut(out)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    y
}

/// xᵀx [k, k] for x [n, k] (the Hessian statistic), f32 GEMM. Only the lower triangle is
/// computed (half the work of a full product) and mirrored.
pub fn gram(x: &[f32], n: usize, k: usize) -> Vec<f32> {
    use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
    let mut g = vec![0f32; k * k];
    let xm = MatRef::from_row_major_slice(x, n, k);
    tri_matmul(
        MatMut::from_row_major_slice_mut(&mut g, k, k),
        BlockStructure::TriangularLower,
        Accum::Replace,
        xm.transpose(),
        BlockStructure::Rectangular,
        xm,
        BlockStructure::Rectangular,
        1.0,
        gemm_par(),
    );
    for i in 0..k {
        for j in i + 1..k {
            g[i * k + j] = g[j * k + i];
        }
    }
    g
}

/// aᵀb [k, k] for a, b [n, k] (a cross statistic between two streams), f32 GEMM.
pub fn cross(a: &[f32], b: &[f32], n: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(a.len(), n * k);
    debug_assert_eq!(b.len(), n * k);
    let mut g = vec![0f32; k * k];
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut g, k, k),
        Accum::Replace,
        MatRef::from_row_major_slice(a, n, k).transpose(),
        MatRef::from_row_major_slice(b, n, k),
        1.0,
        gemm_par(),
    );
    g
}

/// `len` values written piece by piece in parallel (`fill(i, piece)` gets the i-th run of
/// `piece` elements, the last one shorter), without zeroing the allocation first: zeroing the
/// buffers of a forward was ≈ 7% of a bf16 evaluation.
///
/// # Safety
/// `fill` must write every element of every piece it is given.
pub unsafe fn par_fill<T: Send>(
    len: usize,
    piece: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut v: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit has no validity requirement
    unsafe { v.set_len(len) };
    v.par_chunks_mut(piece.max(1))
        .enumerate()
        .for_each(|(i, p)| fill(i, p));
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: the caller's `fill` wrote every element; MaybeUninit<T> has T's layout
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// RMSNorm over rows of width d: x / sqrt(mean(x²) + eps) · w (mean accumulated in f64).
pub fn rms_norm(x: &[f32], d: usize, w: &[f32], eps: f32) -> Vec<f32> {
    assert!(
        d > 0 && x.len().is_multiple_of(d) && w.len() >= d,
        "rms_norm: shapes"
    );
    // SAFETY: rms_row writes every element of its row
    unsafe {
        par_fill(x.len(), d, |i, yr| {
            rms_row(yr, &x[i * d..(i + 1) * d], w, eps)
        })
    }
}

/// One row of [`rms_norm`]: writes every element of `yr` (as long as `xr` and `w`).
#[inline]
fn rms_row(yr: &mut [std::mem::MaybeUninit<f32>], xr: &[f32], w: &[f32], eps: f32) {
    let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / xr.len() as f64;
    let r = 1.0 / ((ms as f32) + eps).sqrt();
    for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
        o.write(g * (v * r));
    }
}

/// The residual add and the next RMSNorm fused, row by row while the row is in cache:
/// r = x + o, h = [`rms_norm`](r) — bit for bit the two separate steps. Returns (r, h).
pub fn add_rms_norm(x: &[f32], o: &[f32], d: usize, w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    assert!(
        x.len() == o.len() && d > 0 && x.len().is_multiple_of(d) && w.len() >= d,
        "add_rms_norm: shapes"
    );
    let mut r = vec![0f32; x.len()];
    let mut h: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(x.len());
    // SAFETY: MaybeUninit has no validity requirement
    unsafe { h.set_len(x.len()) };
    r.par_chunks_mut(d)
        .zip(h.par_chunks_mut(d))
        .zip(x.par_chunks(d).zip(o.par_chunks(d)))
        .for_each(|((rr, hr), (xr, or))| {
            for ((v, &a), &b) in rr.iter_mut().zip(xr).zip(or) {
                *v = a + b;
            }
            rms_row(hr, rr, w, eps);
        });
    let mut h = std::mem::ManuallyDrop::new(h);
    // SAFETY: rms_row wrote every element of every row
    let h = unsafe { Vec::from_raw_parts(h.as_mut_ptr() as *mut f32, h.len(), h.capacity()) };
    (r, h)
}

/// Rotary embedding (rotate-half convention of transformers) applied to x [b, t, h, hd],
/// written transposed to [b, h, t, hd] (the layout attention wants).
/// cos/sin are [max_t, hd/2].
pub fn rope_transpose(
    x: &[f32],
    b: usize,
    t: usize,
    h: usize,
    hd: usize,
    cos: &[f32],
    sin: &[f32],
) -> Vec<f32> {
    let half = hd / 2;
    assert_eq!(x.len(), b * t * h * hd);
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(t * hd).enumerate().for_each(|(bh, out)| {
        let (bi, hi) = (bh / h, bh % h);
        for ti in 0..t {
            let src = &x[((bi * t + ti) * h + hi) * hd..][..hd];
            let dst = &mut out[ti * hd..(ti + 1) * hd];
            let (c, s) = (
                &cos[ti * half..(ti + 1) * half],
                &sin[ti * half..(ti + 1) * half],
            );
            for i in 0..half {
                let (x1, x2) = (src[i], src[i + half]);
                dst[i] = x1 * c[i] - x2 * s[i];
                dst[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    });
    y
}

/// [b, t, h, hd] → [b, h, t, hd] without rotation (values).
pub fn heads_transpose(x: &[f32], b: usize, t: usize, h: usize, hd: usize) -> Vec<f32> {
    assert_eq!(x.len(), b * t * h * hd);
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(t * hd).enumerate().for_each(|(bh, out)| {
        let (bi, hi) = (bh / h, bh % h);
        for ti in 0..t {
            out[ti * hd..(ti + 1) * hd].copy_from_slice(&x[((bi * t + ti) * h + hi) * hd..][..hd]);
        }
    });
    y
}

/// eˣ in f32 without a libm call (so loops over it vectorize): Cody–Waite range reduction
/// x = n·ln 2 + r, |r| ≤ ln 2 / 2, then Cephes' degree-7 minimax polynomial for eʳ (relative
/// error ≤ 2 ulp) and 2ⁿ from the exponent bits. Inputs below ln(f32::MIN_POSITIVE) give that
/// smallest normal (≈ 1.2·10⁻³⁸, nothing next to the sum's largest term, 1); above 88.37, +∞'s
/// neighbour range is clamped (not used by the loss, where x ≤ 0).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.376_26);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let r2 = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * r2
        + r
        + 1.0;
    p * pow2(n)
}

/// 2ⁿ for an integral n in [−126, 128] (128 gives +∞, as the exponent field 255 does), built
/// from the bits of n + 127 + 2²³ — an f32 whose low mantissa bits are n + 127 — instead of an
/// `as i32` cast, whose saturating semantics compile to scalar compare-and-move code per lane
/// and kept the loops over [`exp_f32`] from vectorizing. Bit for bit `(n as i32 + 127) << 23`.
#[inline(always)]
fn pow2(n: f32) -> f32 {
    let biased = (n + (127.0 + 8_388_608.0))
        .to_bits()
        .wrapping_sub(0x4B00_0000);
    f32::from_bits(biased << 23)
}

/// The largest element (−∞ for an empty slice; NaNs are skipped, as `f32::max` does), in
/// eight lanes: a one-lane fold of `max` does not vectorize.
pub fn max_f32(x: &[f32]) -> f32 {
    const L: usize = 8;
    let mut m8 = [f32::NEG_INFINITY; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            m8[l] = m8[l].max(c[l]);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&m8)
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v))
}

/// One causal softmax row in place: `live` (the scores up to the diagonal) becomes
/// exp(x − max) / Σ, with terms below e⁻³⁰ of the largest flushed to zero (they cannot change
/// an f32 sum, and neither the normalisation nor the P·V product then touches denormals).
/// Eight-lane sums and [`exp_f32`], so the loops vectorize.
pub fn softmax_row(live: &mut [f32]) {
    const L: usize = 8;
    let mx = max_f32(live);
    let mut acc = [0f32; L];
    let mut chunks = live.chunks_exact_mut(L);
    for c in &mut chunks {
        for l in 0..L {
            let d = c[l] - mx;
            let e = exp_f32(d);
            c[l] = if d < -30.0 { 0.0 } else { e };
            acc[l] += c[l];
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        let d = *x - mx;
        *x = if d < -30.0 { 0.0 } else { exp_f32(d) };
        sum += *x;
    }
    let sum = acc.iter().sum::<f32>() + sum;
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
}

/// SwiGLU's gate: silu(g) · u, elementwise (silu(x) = x / (1 + e^{−x}), the exponential by
/// [`exp_f32`] so the loop vectorizes).
pub fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "silu_mul: shapes");
    const P: usize = 4096;
    // SAFETY: the loop writes every element of its piece (g and u are as long as y)
    unsafe {
        par_fill(g.len(), P, |i, o| {
            let (g, u) = (&g[i * P..][..o.len()], &u[i * P..][..o.len()]);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                o.write(g / (1.0 + exp_f32(-g)) * u);
            }
        })
    }
}

/// out[i] = table[ids[i]] for rows of width d.
pub fn embed(table: &[f32], d: usize, ids: &[u32]) -> Vec<f32> {
    let mut y = vec![0f32; ids.len() * d];
    for (o, &id) in y.chunks_mut(d).zip(ids) {
        o.copy_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
    }
    y
}

/// a += b elementwise.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(4096)
        .zip(b.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// A router's choice for each token (transformers' `Qwen3MoeTopKRouter`): softmax of the
/// logits [n, experts] in f32, the `k` largest probabilities (ties to the lower expert, as
/// `torch.topk`), divided by their sum when `renormalise`. Returned per expert: the tokens
/// routed to it, ascending, each with its weight.
pub fn route_top_k(
    logits: &[f32],
    n: usize,
    experts: usize,
    k: usize,
    renormalise: bool,
) -> Vec<Vec<(usize, f32)>> {
    assert_eq!(logits.len(), n * experts, "route_top_k: shapes");
    let mut routes: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
    let mut p = vec![0f32; experts];
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for (t, row) in logits.chunks_exact(experts).enumerate() {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (p, &x) in p.iter_mut().zip(row) {
            *p = (x - max).exp();
            sum += *p;
        }
        p.iter_mut().for_each(|p| *p /= sum);
        order.clear();
        order.extend(0..experts);
        // descending probability, the lower index first among equals (a stable sort)
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let top = &order[..k];
        let total: f32 = top.iter().map(|&e| p[e]).sum();
        for &e in top {
            let w = if renormalise { p[e] / total } else { p[e] };
            routes[e].push((t, w));
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn add_rms_norm_is_the_add_then_the_norm_bit_for_bit() {
        let (n, d) = (37, 48);
        let x = rnd(n * d, 1);
        let o = rnd(n * d, 2);
        let w = rnd(d, 3);
        let (r, h) = add_rms_norm(&x, &o, d, &w, 1e-6);
        let mut r2 = x.clone();
        add_assign(&mut r2, &o);
        let h2 = rms_norm(&r2, d, &w, 1e-6);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&r), bits(&r2));
        assert_eq!(bits(&h), bits(&h2));
    }

    /// The unzeroed buffers (`par_fill`) hold what the plain loops compute, over several
    /// pieces and a short last one.
    #[test]
    fn filled_buffers_equal_the_plain_loops() {
        let (g, u) = (rnd(10_001, 5), rnd(10_001, 6));
        let y = silu_mul(&g, &u);
        for i in 0..g.len() {
            assert_eq!(
                y[i].to_bits(),
                (g[i] / (1.0 + exp_f32(-g[i])) * u[i]).to_bits()
            );
        }
        let (n, d) = (301, 24);
        let (x, w) = (rnd(n * d, 7), rnd(d, 8));
        let y = rms_norm(&x, d, &w, 1e-5);
        for r in 0..n {
            let row = &x[r * d..(r + 1) * d];
            let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
            let inv = 1.0 / ((ms as f32) + 1e-5).sqrt();
            for c in 0..d {
                assert_eq!(y[r * d + c].to_bits(), (w[c] * (row[c] * inv)).to_bits());
            }
        }
    }

    #[test]
    fn max_f32_is_the_fold() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for n in [0, 1, 7, 8, 9, 100, 49_152] {
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-50.0f32..50.0)).collect();
            let want = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max_f32(&x).to_bits(), want.to_bits(), "n {n}");
        }
        assert_eq!(max_f32(&[1.0, f32::NAN, 3.0, -2.0]), 3.0);
    }

    #[test]
    fn pow2_is_the_cast_formula_bit_for_bit() {
        for n in -126..=128i32 {
            assert_eq!(pow2(n as f32).to_bits(), ((n + 127) as u32) << 23, "2^{n}");
        }
        assert!((exp_f32(f32::NAN)).is_nan());
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_f64_exp_on_random_inputs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200_000 {
            let x: f32 = rng.gen_range(-87.0..88.0);
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            assert!(
                ((got - want) / want).abs() <= 2.5e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e4) > 0.0 && exp_f32(-1e4) < 1.2e-38);
        assert!(exp_f32(f32::NEG_INFINITY) >= 0.0);
    }

    #[test]
    fn softmax_row_matches_an_f64_softmax_on_random_rows() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for n in [1usize, 5, 8, 17, 64, 333] {
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-40.0f32..12.0)).collect();
            let mut y = x.clone();
            softmax_row(&mut y);
            let m = x.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
            let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
                let want = (xi as f64 - m).exp() / z;
                // flushed: below e^-30 of the largest term
                let tol = 1e-6 * want + 1e-13;
                assert!(
                    (yi as f64 - want).abs() <= tol,
                    "n {n} [{i}]: {yi} vs {want}"
                );
            }
        }
    }

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.gen_range(-1.5f32..1.5)).collect()
    }

    /// The engine runs small calibration batches side by side with single-threaded GEMMs and
    /// relies on their results being the parallel GEMM's, bit for bit (shapes large enough for
    /// faer to split, and awkward ones).
    #[test]
    fn gemm_bits_do_not_depend_on_threads() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (s, &(n, k, out)) in [
            (700, 300, 900),
            (513, 256, 257),
            (37, 1031, 64),
            (2048, 96, 96),
        ]
        .iter()
        .enumerate()
        {
            let x = rnd(n * k, 40 + s as u64);
            let w = rnd(out * k, 50 + s as u64);
            let b = rnd(out, 60 + s as u64);
            let par = linear(&x, n, k, &w, out, Some(&b));
            let seq = single_threaded(|| linear(&x, n, k, &w, out, Some(&b)));
            assert_eq!(bits(&par), bits(&seq), "linear {n}×{k}×{out}");
            let par = gram(&x, n, k);
            let seq = single_threaded(|| gram(&x, n, k));
            assert_eq!(bits(&par), bits(&seq), "gram {n}×{k}");
            let y = rnd(n * k, 70 + s as u64);
            let par = cross(&x, &y, n, k);
            let seq = single_threaded(|| cross(&x, &y, n, k));
            assert_eq!(bits(&par), bits(&seq), "cross {n}×{k}");
        }
        // the switch is scoped: back to parallel afterwards, also after a panic inside
        assert!(!SINGLE_THREADED.with(|c| c.get()));
        let _ = std::panic::catch_unwind(|| single_threaded(|| panic!("inside")));
        assert!(!SINGLE_THREADED.with(|c| c.get()));
    }

    #[test]
    fn linear_matches_definition() {
        let (n, k, o) = (37, 70, 29);
        let (x, w, b) = (rnd(n * k, 1), rnd(o * k, 2), rnd(o, 3));
        let y = linear(&x, n, k, &w, o, Some(&b));
        for i in 0..n {
            for j in 0..o {
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum::<f64>()
                    + b[j] as f64;
                assert!((y[i * o + j] as f64 - want).abs() < 1e-4, "({i},{j})");
            }
        }
    }

    #[test]
    fn gram_matches_definition() {
        let (n, k) = (53, 19);
        let x = rnd(n * k, 4);
        let g = gram(&x, n, k);
        for i in 0..k {
            for j in 0..k {
                let want: f64 = (0..n)
                    .map(|r| x[r * k + i] as f64 * x[r * k + j] as f64)
                    .sum();
                assert!((g[i * k + j] as f64 - want).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn cross_matches_definition() {
        let (n, k) = (41, 23);
        let (a, b) = (rnd(n * k, 7), rnd(n * k, 8));
        let g = cross(&a, &b, n, k);
        for i in 0..k {
            for j in 0..k {
                let want: f64 = (0..n)
                    .map(|r| a[r * k + i] as f64 * b[r * k + j] as f64)
                    .sum();
                assert!((g[i * k + j] as f64 - want).abs() < 1e-3, "({i},{j})");
            }
        }
    }

    #[test]
    fn rms_norm_rope_silu_match_definitions() {
        let d = 16;
        let (x, w) = (rnd(3 * d, 5), rnd(d, 6));
        let y = rms_norm(&x, d, &w, 1e-5);
        for r in 0..3 {
            let ms: f64 = x[r * d..(r + 1) * d]
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                / d as f64;
            for c in 0..d {
                let want = w[c] as f64 * x[r * d + c] as f64 / (ms + 1e-5).sqrt();
                assert!((y[r * d + c] as f64 - want).abs() < 1e-5);
            }
        }
        // rope: [b=1, t=3, h=2, hd=4]; rotate_half(x) = [-x2, x1]
        let (t, h, hd) = (3, 2, 4);
        let x = rnd(t * h * hd, 7);
        let ang: Vec<f32> = (0..t * hd / 2).map(|i| i as f32 * 0.3).collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
        let y = rope_transpose(&x, 1, t, h, hd, &cos, &sin);
        for ti in 0..t {
            for hi in 0..h {
                let v = &x[(ti * h + hi) * hd..][..hd];
                for i in 0..hd {
                    let f = i % (hd / 2);
                    let (c, s) = (cos[ti * 2 + f], sin[ti * 2 + f]);
                    let rot = if i < hd / 2 {
                        -v[i + hd / 2]
                    } else {
                        v[i - hd / 2]
                    };
                    let want = v[i] * c + rot * s;
                    assert!((y[(hi * t + ti) * hd + i] - want).abs() < 1e-6);
                }
            }
        }
        let (g, u) = (rnd(50, 8), rnd(50, 9));
        let y = silu_mul(&g, &u);
        for i in 0..50 {
            let want = g[i] as f64 / (1.0 + (-(g[i] as f64)).exp()) * u[i] as f64;
            assert!((y[i] as f64 - want).abs() < 1e-6);
        }
    }

    /// The router against a direct computation in f64 on random logits: every token goes to
    /// exactly k experts, the k with the largest probabilities, with the renormalised weights.
    #[test]
    fn route_top_k_matches_a_direct_computation() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, e, k) = (200, 8, 2);
        let logits: Vec<f32> = (0..n * e).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        for renorm in [false, true] {
            let routes = route_top_k(&logits, n, e, k, renorm);
            for t in 0..n {
                let row: Vec<f64> = logits[t * e..(t + 1) * e]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let z: f64 = row.iter().map(|x| x.exp()).sum();
                let p: Vec<f64> = row.iter().map(|x| x.exp() / z).collect();
                let mut idx: Vec<usize> = (0..e).collect();
                idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
                let top = &idx[..k];
                let sum: f64 = top.iter().map(|&i| p[i]).sum();
                let got: Vec<(usize, f32)> = (0..e)
                    .filter_map(|x| routes[x].iter().find(|r| r.0 == t).map(|r| (x, r.1)))
                    .collect();
                assert_eq!(got.len(), k, "token {t}");
                for (x, w) in got {
                    assert!(top.contains(&x), "token {t}: expert {x}");
                    let want = if renorm { p[x] / sum } else { p[x] };
                    assert!((w as f64 - want).abs() < 1e-6, "token {t}: {w} vs {want}");
                }
            }
            // each expert's tokens ascending
            assert!(routes.iter().all(|r| r.windows(2).all(|w| w[0].0 < w[1].0)));
        }
    }
}
