//! Statistics of a linear input X [n, d] accumulated over the calibration set:
//! - Hessian H = 2/n · Σ x xᵀ (GPTQ, SparseGPT; Frantar et al. 2022, eq. 1's second derivative)
//! - per-channel max |x| (SmoothQuant), mean |x| (AWQ)
//! - column L2 norms ‖X_j‖₂ (Wanda)

use ndarray::Array2;

/// Which statistics a pass needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsRequest {
    pub hessian: bool,
    pub act_absmax: bool,
    pub act_mean_abs: bool,
    pub col_norm: bool,
    /// The dense model's (teacher's) hidden states at each layer's input and output, carried
    /// beside the compressed stream (one more hidden-state buffer; see `LayerCtx::teacher`).
    pub teacher: bool,
    /// The calibration stream itself, for passes that read raw inputs or call block forwards
    /// with candidate weights without needing accumulated statistics.
    pub inputs: bool,
    /// The layer's weights as they were before the previous pass ran on it (for a pass that
    /// compensates the error of the one before it; see `LayerCtx::previous`). Needs no
    /// calibration forward.
    pub previous: bool,
}

impl StatsRequest {
    /// Whether the engine must run calibration forwards at all.
    pub fn any(&self) -> bool {
        self.hessian
            || self.act_absmax
            || self.act_mean_abs
            || self.col_norm
            || self.teacher
            || self.inputs
    }
    pub fn union(self, o: StatsRequest) -> StatsRequest {
        StatsRequest {
            hessian: self.hessian || o.hessian,
            act_absmax: self.act_absmax || o.act_absmax,
            act_mean_abs: self.act_mean_abs || o.act_mean_abs,
            col_norm: self.col_norm || o.col_norm,
            teacher: self.teacher || o.teacher,
            inputs: self.inputs || o.inputs,
            previous: self.previous || o.previous,
        }
    }
}

/// Running sums for one input site.
#[derive(Clone, Debug)]
pub struct SiteStats {
    pub dim: usize,
    /// Rows (tokens) seen.
    pub n: usize,
    /// Σ x xᵀ (f64), when requested.
    pub xtx: Option<Array2<f64>>,
    pub absmax: Option<Vec<f32>>,
    pub sum_abs: Option<Vec<f64>>,
    pub sum_sq: Option<Vec<f64>>,
}

impl SiteStats {
    pub fn new(dim: usize, req: StatsRequest) -> Self {
        SiteStats {
            dim,
            n: 0,
            xtx: req.hessian.then(|| Array2::zeros((dim, dim))),
            absmax: req.act_absmax.then(|| vec![0f32; dim]),
            sum_abs: req.act_mean_abs.then(|| vec![0f64; dim]),
            sum_sq: req.col_norm.then(|| vec![0f64; dim]),
        }
    }

    /// Add a batch of rows x [n, d] (row-major). `xtx_batch`, when given, is the batch's XᵀX
    /// computed by a fast GEMM (f32); otherwise it is computed here.
    pub fn add(&mut self, x: &[f32], rows: usize, xtx_batch: Option<&[f32]>) {
        let d = self.dim;
        debug_assert_eq!(x.len(), rows * d);
        // the XᵀX given, or computed here in f64
        self.add_rows_with_gram(rows, xtx_batch);
        if let (Some(h), None) = (self.xtx.as_mut(), xtx_batch) {
            for r in 0..rows {
                let row = &x[r * d..(r + 1) * d];
                for i in 0..d {
                    for j in 0..d {
                        h[[i, j]] += row[i] as f64 * row[j] as f64;
                    }
                }
            }
        }
        if let Some(m) = self.absmax.as_mut() {
            for r in 0..rows {
                for (a, v) in m.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                    *a = a.max(v.abs());
                }
            }
        }
        if let Some(s) = self.sum_abs.as_mut() {
            for r in 0..rows {
                for (a, v) in s.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                    *a += v.abs() as f64;
                }
            }
        }
        if let Some(s) = self.sum_sq.as_mut() {
            for r in 0..rows {
                for (a, v) in s.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                    *a += (*v as f64) * (*v as f64);
                }
            }
        }
    }

    /// Count a batch of `rows` whose XᵀX was computed elsewhere, when no statistic but the
    /// Hessian is requested (nothing else needs the rows themselves).
    pub fn add_rows_with_gram(&mut self, rows: usize, xtx_batch: Option<&[f32]>) {
        self.n += rows;
        if let (Some(h), Some(b)) = (self.xtx.as_mut(), xtx_batch) {
            h.as_slice_mut()
                .expect("contiguous")
                .iter_mut()
                .zip(b)
                .for_each(|(a, v)| *a += *v as f64);
        }
    }

    /// H = 2/n · Σ x xᵀ.
    pub fn hessian(&self) -> Option<Array2<f64>> {
        let n = self.n.max(1) as f64;
        self.xtx.as_ref().map(|s| s * (2.0 / n))
    }

    /// Per-channel mean |x|.
    pub fn mean_abs(&self) -> Option<Vec<f64>> {
        let n = self.n.max(1) as f64;
        self.sum_abs
            .as_ref()
            .map(|s| s.iter().map(|v| v / n).collect())
    }

    /// Per-channel ‖X_j‖₂ over all calibration tokens.
    pub fn col_norm(&self) -> Option<Vec<f64>> {
        self.sum_sq
            .as_ref()
            .map(|s| s.iter().map(|v| v.sqrt()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn every_statistic_matches_a_direct_computation() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let d = 12;
        let batches: Vec<(usize, Vec<f32>)> = [7usize, 13, 5]
            .iter()
            .map(|&n| (n, (0..n * d).map(|_| rng.gen_range(-3.0f32..3.0)).collect()))
            .collect();
        let req = StatsRequest {
            hessian: true,
            act_absmax: true,
            act_mean_abs: true,
            col_norm: true,
            teacher: false,
            inputs: false,
            previous: false,
        };
        // once with the GEMM-provided XᵀX, once computed inside
        let mut a = SiteStats::new(d, req);
        let mut b = SiteStats::new(d, req);
        for (n, x) in &batches {
            a.add(x, *n, Some(&crate::model::ops::gram(x, *n, d)));
            b.add(x, *n, None);
        }
        let rows: Vec<&[f32]> = batches.iter().flat_map(|(_, x)| x.chunks(d)).collect();
        let n = rows.len() as f64;
        assert_eq!(a.n, rows.len());
        let (ha, hb) = (a.hessian().unwrap(), b.hessian().unwrap());
        for i in 0..d {
            for j in 0..d {
                let want = 2.0 / n * rows.iter().map(|r| r[i] as f64 * r[j] as f64).sum::<f64>();
                assert!((ha[[i, j]] - want).abs() < 1e-4 * want.abs().max(1.0));
                assert!((hb[[i, j]] - want).abs() < 1e-9 * want.abs().max(1.0));
            }
            let absmax = rows.iter().map(|r| r[i].abs()).fold(0f32, f32::max);
            assert_eq!(a.absmax.as_ref().unwrap()[i], absmax);
            let mean_abs = rows.iter().map(|r| r[i].abs() as f64).sum::<f64>() / n;
            assert!((a.mean_abs().unwrap()[i] - mean_abs).abs() < 1e-9);
            let norm = rows
                .iter()
                .map(|r| (r[i] as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((a.col_norm().unwrap()[i] - norm).abs() < 1e-9);
        }
    }

    #[test]
    fn nothing_is_allocated_that_was_not_requested() {
        let s = SiteStats::new(8, StatsRequest::default());
        assert!(s.xtx.is_none() && s.absmax.is_none() && s.sum_abs.is_none() && s.sum_sq.is_none());
    }
}
