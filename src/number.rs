//! Number formats as data: what a quantized value, or its scale, is stored as.
//!
//! compressed-tensors describes a quantization argument by its number type (`int` or `float`,
//! with `num_bits`), the dtype of its scale, an optional global scale and a strategy. Integer
//! grids are the `quant` module's; this file holds the small float formats the float schemes
//! use — OCP FP8 E4M3 ("fn": no infinities, one NaN pattern, max 448) and E5M2 (IEEE-like, max
//! 57344), FP4 E2M1 (max 6, no NaN/∞) and the exponent-only E8M0 of microscaling scales — and
//! the scale types (f16, bf16, f32, E4M3, E8M0). Each format is a handful of constants; encoding
//! is round-to-nearest-even onto the format's values with saturation at ±max, which is what
//! compressed-tensors gets by clamping to `finfo.min/max` before `tensor.to(float8_e4m3fn)`.
//!
//! Pure functions only.

use serde::{Deserialize, Serialize};

/// A small float format, described by its field widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatFormat {
    /// 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN, no infinities.
    E4M3,
    /// 1 sign, 5 exponent (bias 15), 2 mantissa bits; IEEE infinities and NaNs.
    E5M2,
    /// 1 sign, 2 exponent (bias 1), 1 mantissa bit; every code a number (±0, 0.5 … 6).
    E2M1,
    /// 8 exponent bits (bias 127), no sign or mantissa: 2^(e−127); 0xFF is NaN (OCP MX scales).
    E8M0,
}

/// The shape of a format: field widths, bias and special values.
#[derive(Clone, Copy, Debug)]
struct Layout {
    sign: bool,
    exp: u32,
    man: u32,
    bias: i32,
    /// IEEE-style top exponent (∞ and NaN) as in E5M2.
    ieee_specials: bool,
    /// The one NaN magnitude code (all ones) of E4M3 / E8M0.
    nan_all_ones: bool,
}

impl FloatFormat {
    pub const ALL: [FloatFormat; 4] = [
        FloatFormat::E4M3,
        FloatFormat::E5M2,
        FloatFormat::E2M1,
        FloatFormat::E8M0,
    ];

    fn layout(self) -> Layout {
        let l = |sign, exp, man, bias, ieee_specials, nan_all_ones| Layout {
            sign,
            exp,
            man,
            bias,
            ieee_specials,
            nan_all_ones,
        };
        match self {
            FloatFormat::E4M3 => l(true, 4, 3, 7, false, true),
            FloatFormat::E5M2 => l(true, 5, 2, 15, true, false),
            FloatFormat::E2M1 => l(true, 2, 1, 1, false, false),
            FloatFormat::E8M0 => l(false, 8, 0, 127, false, true),
        }
    }

    /// The name compressed-tensors and safetensors use (`F8_E4M3` is the safetensors dtype).
    pub fn name(self) -> &'static str {
        match self {
            FloatFormat::E4M3 => "e4m3",
            FloatFormat::E5M2 => "e5m2",
            FloatFormat::E2M1 => "e2m1",
            FloatFormat::E8M0 => "e8m0",
        }
    }

    /// Bits per value.
    pub fn bits(self) -> u32 {
        let l = self.layout();
        l.sign as u32 + l.exp + l.man
    }

    /// The number of codes.
    fn codes(self) -> u32 {
        1 << self.bits()
    }

    /// The value of `code` (its low `bits()` bits).
    pub fn decode(self, code: u8) -> f32 {
        let l = self.layout();
        let code = code as u32 & (self.codes() - 1);
        let mag_bits = l.exp + l.man;
        let negative = l.sign && (code >> mag_bits) & 1 == 1;
        let mag = code & ((1 << mag_bits) - 1);
        let e = (mag >> l.man) as i32;
        let m = mag & ((1 << l.man) - 1);
        let top = (1i32 << l.exp) - 1;
        let v = if l.nan_all_ones && mag == (1 << mag_bits) - 1 {
            f32::NAN
        } else if l.ieee_specials && e == top {
            if m == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else if e == 0 && l.man > 0 {
            // subnormal: 0.m × 2^(1−bias)
            m as f32 / (1u32 << l.man) as f32 * 2f32.powi(1 - l.bias)
        } else {
            (1.0 + m as f32 / (1u32 << l.man) as f32) * 2f32.powi(e - l.bias)
        };
        if negative {
            -v
        } else {
            v
        }
    }

    /// The largest finite value.
    pub fn max(self) -> f32 {
        match self {
            FloatFormat::E4M3 => 448.0,
            FloatFormat::E5M2 => 57344.0,
            FloatFormat::E2M1 => 6.0,
            FloatFormat::E8M0 => 2f32.powi(127),
        }
    }

    /// The smallest positive value (subnormal where the format has them).
    pub fn min_positive(self) -> f32 {
        let l = self.layout();
        if l.man == 0 {
            2f32.powi(-l.bias)
        } else {
            2f32.powi(1 - l.bias - l.man as i32)
        }
    }

    /// The code of `x`: round to the nearest value, ties to the even code (an even mantissa),
    /// saturating at ±max; NaN → the NaN code (E2M1 has none: 0). E8M0 takes |x| and rounds
    /// in the exponent (ties up: 1.5·2^k → 2^(k+1)); zero and tiny values go to 2^−127.
    pub fn encode(self, x: f32) -> u8 {
        let l = self.layout();
        let mag_bits = l.exp + l.man;
        let sign_bit = if l.sign && x.is_sign_negative() {
            1u32 << mag_bits
        } else {
            0
        };
        if x.is_nan() {
            return match self {
                FloatFormat::E2M1 => 0,
                FloatFormat::E5M2 => (sign_bit | 0x7F) as u8,
                _ => (sign_bit | ((1 << mag_bits) - 1)) as u8,
            };
        }
        let a = x.abs().min(self.max());
        if self == FloatFormat::E8M0 {
            if a <= 2f32.powi(-127) {
                return 0;
            }
            // nearest power of two in the linear sense: 2^k when a < 1.5·2^k
            let k = a.log2().floor() as i32;
            let k = if a >= 1.5 * 2f32.powi(k) { k + 1 } else { k };
            return (k + l.bias).clamp(0, 254) as u8;
        }
        // magnitudes are monotone in their codes: find the nearest by the exact midpoint rule
        // on f64 (every value and midpoint of these formats is exact there)
        let a = a as f64;
        let top = if l.nan_all_ones {
            (1u32 << mag_bits) - 2
        } else if l.ieee_specials {
            (((1u32 << l.exp) - 1) << l.man) - 1
        } else {
            (1u32 << mag_bits) - 1
        } as usize;
        let value = |c: usize| self.decode(c as u8) as f64;
        // the greatest code whose value is ≤ a (binary search over 0..top)
        let (mut lo, mut hi) = (0usize, top);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if value(mid) <= a {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let mut c = lo;
        if c < top && value(c) != a {
            let (below, above) = (value(c), value(c + 1));
            let mid = (below + above) / 2.0;
            if a > mid || (a == mid && c % 2 == 1) {
                c += 1;
            }
        }
        (sign_bit | c as u32) as u8
    }

    /// `x` rounded onto the format: `decode(encode(x))`, computed on the f32 bits (the
    /// activation quantizers call this for every value).
    pub fn round(self, x: f32) -> f32 {
        let l = self.layout();
        if self == FloatFormat::E8M0 || x.is_nan() {
            return self.decode(self.encode(x));
        }
        let a = x.abs();
        let max = self.max();
        let r = if a >= max {
            max
        } else {
            let emin = 1 - l.bias; // the smallest normal exponent
            if a < 2f32.powi(emin) {
                // subnormal: a multiple of 2^(emin − man), ties to even
                let q = 2f32.powi(emin - l.man as i32);
                (a / q).round_ties_even() * q
            } else {
                // keep `man` mantissa bits, round to nearest even on the bits below
                let shift = 23 - l.man;
                let b = a.to_bits();
                let lsb = (b >> shift) & 1;
                let b = (b + (1 << (shift - 1)) - 1 + lsb) & !((1u32 << shift) - 1);
                f32::from_bits(b).min(max)
            }
        };
        r.copysign(x)
    }
}

/// What a quantized value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NumType {
    /// A signed integer grid of `bits` bits (stored with an offset of 2^(bits−1) when packed).
    Int { bits: u32 },
    /// A small float.
    Float { format: FloatFormat },
}

impl NumType {
    pub fn bits(self) -> u32 {
        match self {
            NumType::Int { bits } => bits,
            NumType::Float { format } => format.bits(),
        }
    }

    /// compressed-tensors' `type` field.
    pub fn kind(self) -> &'static str {
        match self {
            NumType::Int { .. } => "int",
            NumType::Float { .. } => "float",
        }
    }
}

/// What a scale (or a global scale) is stored as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleType {
    F16,
    BF16,
    F32,
    /// FP8 E4M3 scales (NVFP4: one per 16 values, under an f32 global scale).
    E4M3,
    /// Power-of-two scales (MXFP4 / MXFP8: one per 32 values).
    E8M0,
}

impl ScaleType {
    /// `x` as stored: rounded to nearest even in the scale's type.
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleType::F16 => half::f16::from_f32(x).to_f32(),
            ScaleType::BF16 => half::bf16::from_f32(x).to_f32(),
            ScaleType::F32 => x,
            ScaleType::E4M3 => FloatFormat::E4M3.round(x),
            ScaleType::E8M0 => FloatFormat::E8M0.round(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The reference decoder: the textbook formula per format, written out separately.
    fn reference_value(f: FloatFormat, c: u8) -> f32 {
        match f {
            FloatFormat::E4M3 => {
                let s = if c & 0x80 != 0 { -1.0 } else { 1.0 };
                let e = ((c >> 3) & 0xF) as i32;
                let m = (c & 7) as f32;
                if c & 0x7F == 0x7F {
                    f32::NAN
                } else if e == 0 {
                    s * m / 8.0 * 2f32.powi(-6)
                } else {
                    s * (1.0 + m / 8.0) * 2f32.powi(e - 7)
                }
            }
            FloatFormat::E5M2 => {
                // the top byte of an IEEE half
                half::f16::from_bits((c as u16) << 8).to_f32()
            }
            FloatFormat::E2M1 => {
                let t = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
                let v = t[(c & 7) as usize];
                if c & 8 != 0 {
                    -v
                } else {
                    v
                }
            }
            FloatFormat::E8M0 => {
                if c == 0xFF {
                    f32::NAN
                } else {
                    2f32.powi(c as i32 - 127)
                }
            }
        }
    }

    #[test]
    fn every_code_decodes_as_the_reference_says() {
        for f in FloatFormat::ALL {
            for c in 0..(1u32 << f.bits()) {
                let (a, b) = (f.decode(c as u8), reference_value(f, c as u8));
                assert!(
                    a == b || (a.is_nan() && b.is_nan()),
                    "{f:?} code {c:#x}: {a} vs {b}"
                );
            }
        }
        assert_eq!(FloatFormat::E4M3.decode(0x7E), 448.0);
        assert_eq!(FloatFormat::E5M2.decode(0x7B), 57344.0);
        assert_eq!(FloatFormat::E4M3.min_positive(), 2f32.powi(-9));
        assert_eq!(FloatFormat::E2M1.min_positive(), 0.5);
    }

    /// Brute force: the nearest finite value, ties to the even code, saturating.
    fn reference_encode(f: FloatFormat, x: f32) -> f32 {
        let mut best: Option<(f64, u32, f32)> = None;
        for c in 0..(1u32 << f.bits()) {
            let v = reference_value(f, c as u8);
            if !v.is_finite() || (v == 0.0 && v.is_sign_negative() != x.is_sign_negative()) {
                continue;
            }
            if f != FloatFormat::E8M0 && v.is_sign_negative() != x.is_sign_negative() && v != 0.0 {
                continue;
            }
            let d = (v as f64 - (x as f64).clamp(-f.max() as f64, f.max() as f64)).abs();
            let better = match best {
                None => true,
                Some((bd, bc, _)) => d < bd || (d == bd && (c & 1) == 0 && (bc & 1) == 1),
            };
            if better {
                best = Some((d, c, v));
            }
        }
        best.map(|b| b.2).unwrap_or(f32::NAN)
    }

    #[test]
    fn encoding_is_nearest_ties_to_even_with_saturation() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for f in [FloatFormat::E4M3, FloatFormat::E5M2, FloatFormat::E2M1] {
            let mut xs: Vec<f32> = (0..20_000)
                .map(|_| {
                    let mag = 2f32.powf(rng.gen_range(-14.0..(f.max().log2() + 2.0)));
                    if rng.gen_bool(0.5) {
                        -mag
                    } else {
                        mag
                    }
                })
                .collect();
            // every value, every midpoint between neighbours, and just beside them
            for c in 0..(1u32 << f.bits()) {
                let v = f.decode(c as u8);
                if v.is_finite() {
                    xs.extend([v, v * 1.0001, v * 0.9999]);
                    let n = f.decode(c as u8 + 1);
                    if n.is_finite() && c + 1 < (1 << f.bits()) && (n.abs() > v.abs()) {
                        xs.push((v + n) / 2.0);
                    }
                }
            }
            xs.extend([0.0, -0.0, 1e9, -1e9, f.max(), -f.max()]);
            for x in xs {
                let got = f.round(x);
                let want = reference_encode(f, x);
                assert!(
                    got == want && got.is_sign_negative() == want.is_sign_negative(),
                    "{f:?}: {x} → {got}, reference {want}"
                );
            }
            assert!(f.decode(f.encode(f32::NAN)).is_nan() || f == FloatFormat::E2M1);
        }
    }

    /// The bit-level `round` equals decoding the encoded code, on random values of every
    /// magnitude (subnormals, ties, saturation) and on every code's neighbourhood.
    #[test]
    fn round_equals_decode_of_encode() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for f in [FloatFormat::E4M3, FloatFormat::E5M2, FloatFormat::E2M1] {
            let mut xs: Vec<f32> = (0..20000)
                .map(|_| {
                    let e: i32 = rng.gen_range(-20..18);
                    rng.gen_range(-1.0f32..1.0) * 2f32.powi(e)
                })
                .collect();
            for c in 0..(1u32 << f.bits()) {
                let v = f.decode(c as u8);
                if v.is_finite() {
                    xs.extend([v, v * 1.0001, v * 0.9999, v + f.min_positive() / 2.0]);
                }
            }
            for x in xs {
                let want = f.decode(f.encode(x));
                let got = f.round(x);
                assert_eq!(
                    got.to_bits() & 0x7fff_ffff,
                    want.to_bits() & 0x7fff_ffff,
                    "{f:?} round({x:e}) = {got:e}, decode(encode) = {want:e}"
                );
            }
        }
    }

    #[test]
    fn e8m0_rounds_in_the_exponent() {
        let f = FloatFormat::E8M0;
        for k in -126..127 {
            let p = 2f32.powi(k);
            assert_eq!(f.round(p), p);
            assert_eq!(f.round(p * 1.49), p);
            assert_eq!(f.round(p * 1.5), p * 2.0);
        }
        assert_eq!(f.encode(0.0), 0);
        assert!(f.decode(0xFF).is_nan());
    }

    #[test]
    fn scale_types_round_as_stored() {
        let x = 0.123_456_79f32;
        assert_eq!(ScaleType::F32.round(x), x);
        assert_eq!(ScaleType::BF16.round(x), half::bf16::from_f32(x).to_f32());
        assert_eq!(ScaleType::F16.round(x), half::f16::from_f32(x).to_f32());
        assert_eq!(ScaleType::E4M3.round(x), FloatFormat::E4M3.round(x));
        assert_eq!(ScaleType::E8M0.round(x), 0.125);
        assert_eq!(NumType::Int { bits: 4 }.bits(), 4);
        assert_eq!(
            NumType::Float {
                format: FloatFormat::E2M1
            }
            .bits(),
            4
        );
    }
}
