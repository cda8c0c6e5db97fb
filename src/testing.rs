//! Random test problems shared by the unit tests of the passes (compiled only for tests).
//!
//! One seeded 64-bit LCG (Knuth's MMIX constants) so every test's inputs are reproducible
//! without a rand dependency, and the correlated layer problem the pruning, low-rank and
//! adapter tests measure their methods on.

use ndarray::Array2;

/// 64-bit linear congruential generator.
pub struct Lcg(pub u64);

impl Lcg {
    fn step(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }

    /// Standard normal draw (Box–Muller on two uniforms, the first kept away from 0).
    pub fn gaussian(&mut self) -> f64 {
        let u1 = (self.step() as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = self.step() as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A layer with correlated inputs: X = Z·A (Z [n, cols] standard normal, A a random mixing,
/// its row i scaled by 1/(1 + i) when `decay`, which makes the correlation strong), W [rows,
/// cols] standard normal; returns (W, H = 2/n · XᵀX).
pub fn correlated_problem(
    rows: usize,
    cols: usize,
    n: usize,
    seed: u64,
    decay: bool,
) -> (Array2<f32>, Array2<f64>) {
    let mut g = Lcg(seed);
    let a = Array2::from_shape_fn((cols, cols), |(i, _)| {
        g.gaussian() / if decay { 1.0 + i as f64 } else { 1.0 }
    });
    let z = Array2::from_shape_fn((n, cols), |_| g.gaussian());
    let x = z.dot(&a);
    let h = x.t().dot(&x) * (2.0 / n as f64);
    let w = Array2::from_shape_fn((rows, cols), |_| g.gaussian() as f32);
    (w, h)
}
