//! bf16 compute for evaluation (`eval.precision: bf16`): y = x·Wᵀ with W and x rounded to
//! bfloat16 and every product accumulated in f32 — what a bf16 GEMM with f32 accumulation
//! (PyTorch on a bf16 CPU/GPU path) computes.
//!
//! On CPUs with AVX512-BF16 (`vdpbf16ps`: 32 bf16 products per instruction, twice the f32 FMA
//! rate) the product runs in the kernel below: W is packed once into panels of [`NR`] output
//! columns, each 32-bit lane holding one column's pair (w[2p], w[2p+1]); a row of x is
//! converted to the same pairs and broadcast; an [`MR`]×[`NR`] tile of y stays in 16 registers
//! while the pairs of k stream through. Without the instruction the same bf16-rounded values
//! are multiplied by the f32 GEMM ([`super::ops::linear`]), so results differ between the two
//! paths only by the order of the f32 sums.
//!
//! Rounding to bf16 is round-to-nearest-even (NaN stays NaN), as PyTorch's
//! `to(torch.bfloat16)`.

pub mod packed_int;

use rayon::prelude::*;

/// Output columns per packed panel (two 16-lane registers).
pub const NR: usize = 32;
/// Rows of x per register tile.
pub const MR: usize = 8;
/// Rows of x per parallel task.
const MC: usize = 64;
/// Rows of x per parallel task when the panels are decoded from integer codes: each decoded
/// chunk serves four times the rows, so decoding stays a few percent of the products.
const MC_INT: usize = 256;
/// Panels per parallel task.
const NC: usize = 8;
/// Pairs of k per pass over a task's tiles (a panel's chunk: KC × NR × 4 bytes = 48 KiB, in L2).
const KC: usize = 384;

/// f32 → bf16 bits, round to nearest even: the `half` crate's conversion (as
/// [`crate::quant::round_to`]) bit for bit, written without branches so that loops over it
/// vectorize — (x + 0x7FFF + lsb) >> 16, and a NaN keeps its high bits with the quiet bit set.
#[inline(always)]
pub(super) fn to_bf16(v: f32) -> u16 {
    let x = v.to_bits();
    let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    (if nan { (x >> 16) | 0x0040 } else { rounded }) as u16
}

/// Row `s` (k values) as bf16 pairs in `d` (⌈k/2⌉ words: element 2p in the low half, 2p + 1
/// in the high half, a zero high half past an odd k).
#[inline]
fn pack_pairs(d: &mut [u32], s: &[f32]) {
    // SAFETY: u32 → MaybeUninit<u32> only widens what may be stored
    let d = unsafe { &mut *(d as *mut [u32] as *mut [std::mem::MaybeUninit<u32>]) };
    pack_pairs_into(d, s)
}

/// [`pack_pairs`] into an uninitialized row: writes all of `d` (⌈k/2⌉ words).
#[inline]
fn pack_pairs_into(d: &mut [std::mem::MaybeUninit<u32>], s: &[f32]) {
    assert_eq!(d.len(), s.len().div_ceil(2), "pack_pairs: shapes");
    let mut pairs = s.chunks_exact(2);
    for (o, pr) in d.iter_mut().zip(&mut pairs) {
        o.write(to_bf16(pr[0]) as u32 | ((to_bf16(pr[1]) as u32) << 16));
    }
    if let [last] = pairs.remainder() {
        d[s.len() / 2].write(to_bf16(*last) as u32);
    }
}

/// bf16 bits → f32 (exact).
#[inline]
fn from_bf16(h: u16) -> f32 {
    half::bf16::from_bits(h).to_f32()
}

/// Whether this CPU runs the AVX512-BF16 kernel.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight [out, k] rounded to bf16 and laid out for [`PackedBf16::matmul`].
pub struct PackedBf16 {
    out: usize,
    k: usize,
    /// k/2 rounded up: pairs per row.
    kp: usize,
    src: Source,
}

/// Where the kernel's panels come from.
enum Source {
    /// Native path: per panel of NR columns, kp × NR lanes (w[j][2p] low, w[j][2p+1] high).
    Panels(Vec<u32>),
    /// Native path: integer codes decoded into such panels chunk by chunk
    /// ([`packed_int`]).
    Int(packed_int::IntPanels),
    /// Fallback path: the bf16-rounded weight as f32, [out, k].
    Rounded(Vec<f32>),
}

impl PackedBf16 {
    /// Round and pack `w` ([out, k], row-major).
    pub fn pack(w: &[f32], out: usize, k: usize) -> Self {
        Self::pack_for(w, out, k, native())
    }

    /// [`PackedBf16::pack`] for the kernel (`kernel`, only where [`native`]) or the fallback.
    fn pack_for(w: &[f32], out: usize, k: usize, kernel: bool) -> Self {
        assert_eq!(w.len(), out * k, "weight is not [out, k]");
        assert!(
            !kernel || native(),
            "the AVX512-BF16 kernel needs the CPU feature"
        );
        let kp = k.div_ceil(2);
        if !kernel {
            return PackedBf16 {
                out,
                k,
                kp,
                src: Source::Rounded(w.iter().map(|v| from_bf16(to_bf16(*v))).collect()),
            };
        }
        let np = out.div_ceil(NR);
        let mut panels = vec![0u32; np * kp * NR];
        panels
            .par_chunks_mut((kp * NR).max(1))
            .enumerate()
            .for_each(|(pi, panel)| {
                for c in 0..NR {
                    let j = pi * NR + c;
                    if j >= out {
                        break;
                    }
                    let mut pairs = vec![0u32; kp];
                    pack_pairs(&mut pairs, &w[j * k..(j + 1) * k]);
                    for (p, v) in pairs.iter().enumerate() {
                        panel[p * NR + c] = *v;
                    }
                }
            });
        PackedBf16 {
            out,
            k,
            kp,
            src: Source::Panels(panels),
        }
    }

    /// A quantized weight for the kernel: kept as its integer codes and decoded chunk by chunk
    /// ([`packed_int`]) where the kernel runs; the same values as
    /// [`PackedBf16::pack`] of its dequantization either way.
    pub fn pack_quantized(q: &crate::quant::QuantizedLinear) -> Self {
        Self::pack_quantized_for(q, native())
    }

    fn pack_quantized_for(q: &crate::quant::QuantizedLinear, kernel: bool) -> Self {
        if !kernel {
            let w = q.dequantize();
            let (out, k) = w.dim();
            return Self::pack_for(w.as_slice().expect("standard layout"), out, k, false);
        }
        let p = packed_int::IntPanels::new(q);
        PackedBf16 {
            out: p.out,
            k: p.k,
            kp: p.kp,
            src: Source::Int(p),
        }
    }

    /// Whether the weight is held as integer codes.
    pub fn is_int(&self) -> bool {
        matches!(self.src, Source::Int(_))
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.k)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.src {
            Source::Panels(v) => v.len() * 4,
            Source::Int(p) => p.bytes(),
            Source::Rounded(v) => v.len() * 4,
        }
    }

    /// y [n, out] = bf16(x) [n, k] · bf16(W)ᵀ, f32 accumulation, plus bias (f32).
    pub fn matmul(&self, x: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
        assert_eq!(x.len(), n * self.k, "input is not [n, k]");
        if let Source::Rounded(rounded) = &self.src {
            let xr: Vec<f32> = x.iter().map(|v| from_bf16(to_bf16(*v))).collect();
            return super::ops::linear(&xr, n, self.k, rounded, self.out, bias);
        }
        #[cfg(target_arch = "x86_64")]
        {
            self.matmul_native(x, n, bias)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            unreachable!("packed panels exist only where the kernel runs")
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn matmul_native(&self, x: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (k, kp, out) = (self.k, self.kp, self.out);
        if kp == 0 {
            // no products: y is the bias (or zero)
            let mut y = vec![0f32; n * out];
            if let Some(b) = bias {
                y.chunks_mut(out.max(1))
                    .for_each(|r| r.iter_mut().zip(b).for_each(|(v, b)| *v = *b));
            }
            return y;
        }
        // x as bf16 pairs, [n, kp]
        // SAFETY: pack_pairs_into writes all kp words of its row
        let xp: Vec<u32> = unsafe {
            super::ops::par_fill(n * kp, kp, |i, d| {
                pack_pairs_into(d, &x[i * k..(i + 1) * k])
            })
        };
        // Not zeroed: the first k-chunk's tiles (`init`) write every (row, column) of y before
        // anything reads it — zeroing first was ≈ 3% of a bf16 forward.
        let mut y: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(n * out);
        // SAFETY: MaybeUninit<f32> has no validity requirement
        unsafe { y.set_len(n * out) };
        let np = out.div_ceil(NR);
        let mc = if self.is_int() { MC_INT } else { MC };
        let tiles: Vec<(usize, usize)> = (0..n.div_ceil(mc))
            .flat_map(|r| (0..np.div_ceil(NC)).map(move |c| (r, c)))
            .collect();
        let yp = SendPtr(y.as_mut_ptr() as *mut f32);
        tiles.par_iter().for_each(|&(rb, cb)| {
            let yp = &yp;
            let rows = rb * mc..((rb + 1) * mc).min(n);
            let mut decoded = match self.src {
                Source::Int(_) => vec![0u32; KC * NR],
                _ => Vec::new(),
            };
            let panels = cb * NC..((cb + 1) * NC).min(np);
            // k in chunks of KC pairs, so a panel's chunk stays in L1 across the row tiles
            let mut p0 = 0;
            while p0 < kp {
                let p1 = (p0 + KC).min(kp);
                for pi in panels.clone() {
                    // pairs p0..p1 of the panel, (p1 − p0) × NR lanes
                    let chunk: &[u32] = match &self.src {
                        Source::Panels(v) => &v[(pi * kp + p0) * NR..(pi * kp + p1) * NR],
                        Source::Int(ip) => {
                            ip.decode(pi, p0, p1, &mut decoded);
                            &decoded[..(p1 - p0) * NR]
                        }
                        Source::Rounded(_) => unreachable!("handled above"),
                    };
                    let j0 = pi * NR;
                    let cols = NR.min(out - j0);
                    let mut i0 = rows.start;
                    while i0 < rows.end {
                        let mr = MR.min(rows.end - i0);
                        // SAFETY: native() was checked when the panels were packed; x holds
                        // mr rows of kp pairs from i0, the chunk (p1 − p0) × NR lanes, and the
                        // (rows, columns) of y written belong to this task alone
                        unsafe {
                            micro(
                                mr,
                                xp.as_ptr().add(i0 * kp + p0),
                                kp,
                                chunk.as_ptr(),
                                p1 - p0,
                                yp.0.add(i0 * out + j0),
                                out,
                                cols,
                                p0 == 0,
                            )
                        };
                        i0 += mr;
                    }
                }
                p0 = p1;
            }
            if let Some(b) = bias {
                for i in rows {
                    for pi in panels.clone() {
                        let j0 = pi * NR;
                        let cols = NR.min(out - j0);
                        // SAFETY: as above, this task's part of y
                        let row =
                            unsafe { std::slice::from_raw_parts_mut(yp.0.add(i * out + j0), cols) };
                        row.iter_mut()
                            .zip(&b[j0..j0 + cols])
                            .for_each(|(v, b)| *v += b);
                    }
                }
            }
        });
        // SAFETY: every element was written (above); MaybeUninit<f32> has f32's layout
        let mut y = std::mem::ManuallyDrop::new(y);
        unsafe { Vec::from_raw_parts(y.as_mut_ptr() as *mut f32, y.len(), y.capacity()) }
    }
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16 [{}, {}]", self.out, self.k)
    }
}

struct SendPtr(*mut f32);
// SAFETY: tiles write disjoint parts of y
unsafe impl Sync for SendPtr {}

/// One register tile of y (rows i0..i0+mr, columns j0..j0+cols at `y`, row stride `ldy`):
/// y += Σ over `kc` pairs of x pair (row, p) · panel pair (p, column) — or y = that sum when
/// `init`. `x` points at the tile's first row and pair (row stride `ldx` pairs), `w` at the
/// panel's first pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    mr: usize,
    x: *const u32,
    ldx: usize,
    w: *const u32,
    kc: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    init: bool,
) {
    use std::arch::x86_64::*;
    let m0: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        (1u16 << cols) - 1
    };
    let m1: __mmask16 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        (1u16 << (cols - 16)) - 1
    } else {
        0
    };
    let z = _mm512_setzero_ps();
    let mut a = [[z; 2]; MR];
    if !init {
        for (r, ar) in a.iter_mut().enumerate().take(mr) {
            ar[0] = _mm512_maskz_loadu_ps(m0, y.add(r * ldy));
            ar[1] = _mm512_maskz_loadu_ps(m1, y.add(r * ldy + 16));
        }
    }
    macro_rules! tile {
        ($m:expr) => {
            for p in 0..kc {
                let w0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(w.add(p * NR) as *const _));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(w.add(p * NR + 16) as *const _));
                for r in 0..$m {
                    let b: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*x.add(r * ldx + p) as i32));
                    a[r][0] = _mm512_dpbf16_ps(a[r][0], b, w0);
                    a[r][1] = _mm512_dpbf16_ps(a[r][1], b, w1);
                }
            }
        };
    }
    // a constant trip count lets the compiler keep the tile in registers
    match mr {
        8 => tile!(8),
        7 => tile!(7),
        6 => tile!(6),
        5 => tile!(5),
        4 => tile!(4),
        3 => tile!(3),
        2 => tile!(2),
        _ => tile!(1),
    }
    for (r, ar) in a.iter().enumerate().take(mr) {
        _mm512_mask_storeu_ps(y.add(r * ldy), m0, ar[0]);
        _mm512_mask_storeu_ps(y.add(r * ldy + 16), m1, ar[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_bf16_is_the_half_crates_rounding_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
        let special = [
            0u32,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x7F80_0001,
            0xFF81_2345,
            0x7F7F_FFFF,
            0x0000_8000,
            0x0001_8000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
            0x0000_0001,
            0x807F_FFFF,
        ];
        let random = (0..1_000_000).map(|_| rng.gen::<u32>());
        for b in special.into_iter().chain(random) {
            let v = f32::from_bits(b);
            assert_eq!(to_bf16(v), half::bf16::from_f32(v).to_bits(), "{b:#010x}");
        }
        // pairs, odd and even lengths
        let x: Vec<f32> = (0..7).map(|i| i as f32 * 1.37 - 3.0).collect();
        let mut d = vec![0u32; 4];
        pack_pairs(&mut d, &x);
        for (p, w) in d.iter().enumerate() {
            assert_eq!(*w as u16, to_bf16(x[2 * p]));
            let hi = x.get(2 * p + 1).map_or(0, |v| to_bf16(*v));
            assert_eq!((*w >> 16) as u16, hi);
        }
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against a direct f64 sum over the bf16-rounded operands, on random inputs of awkward
    /// shapes (odd k, rows and columns not multiples of the tiles, k over one KC chunk), with
    /// and without bias — the fallback always, the kernel where the CPU has it.
    #[test]
    fn matmul_matches_a_direct_sum_of_rounded_products() {
        if native() {
            // k = 0: no products, y is the bias
            let p = PackedBf16::pack_for(&[], 3, 0, true);
            assert_eq!(
                p.matmul(&[], 2, Some(&[1.0, 2.0, 3.0])),
                [1., 2., 3., 1., 2., 3.]
            );
        }
        eprintln!(
            "bf16 GEMM path: {}",
            if native() {
                "AVX512-BF16 kernel"
            } else {
                "fallback (no AVX512-BF16 on this CPU)"
            }
        );
        let kernels = if native() {
            vec![false, true]
        } else {
            vec![false]
        };
        for (kernel, (n, k, out, bias)) in kernels.into_iter().flat_map(|kn| {
            [
                (1, 1, 1, false),
                (3, 7, 5, true),
                (9, 64, 33, false),
                (70, 129, 100, true),
                (130, 256, 65, true),
                (17, 2 * KC + 37, 40, false),
            ]
            .into_iter()
            .map(move |s| (kn, s))
        }) {
            let x = rand(n * k, (n * 31 + k) as u64);
            let w = rand(out * k, (out * 17 + k) as u64);
            let b = rand(out, 5);
            let p = PackedBf16::pack_for(&w, out, k, kernel);
            let y = p.matmul(&x, n, bias.then_some(&b[..]));
            for i in 0..n {
                for j in 0..out {
                    let mut s = 0f64;
                    let mut mag = 0f64;
                    for c in 0..k {
                        let t = from_bf16(to_bf16(x[i * k + c])) as f64
                            * from_bf16(to_bf16(w[j * k + c])) as f64;
                        s += t;
                        mag += t.abs();
                    }
                    if bias {
                        s += b[j] as f64;
                    }
                    let got = y[i * out + j] as f64;
                    // f32 accumulation of k exact products: error ≤ k·2⁻²⁴·Σ|products|
                    let tol = (k as f64 + 2.0) * 6e-8 * (mag + 1.0);
                    assert!(
                        (got - s).abs() <= tol,
                        "kernel {kernel}, n {n} k {k} out {out}: y[{i},{j}] = {got}, reference {s}"
                    );
                }
            }
        }
    }
}
