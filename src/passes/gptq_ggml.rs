//! GPTQ onto llama.cpp's grids — the column sweep of Frantar et al. (2022, Algorithm 1; see
//! `gptq.rs`) where the quantizer of each column is the ggml block type the GGUF file will hold
//! (Q4_0 … Q8_0 in blocks of 32, Q4_K / Q5_K / Q6_K in super-blocks of 256), so the integers
//! written are exactly the ones GPTQ compensated for.
//!
//! llama.cpp's own quantizer rounds each block to nearest on its grid; with an importance matrix
//! (`llama-imatrix`) it weighs each element's error by diag(XᵀX), the diagonal of the Hessian.
//! GPTQ uses the whole Hessian H = 2XᵀX: after fixing column i it moves the columns not yet
//! fixed to cancel the output error (eq. 3, δ_F = −(w_q − q)/[H_F⁻¹]_qq · (H_F⁻¹)_{:,q}, done with
//! the Cholesky factor of H⁻¹ in blocks, as in `sweep.rs`). Two orders ([`Order`]):
//!
//! * **static** (default, `act_order: true`; llm-compressor's `actorder: static`): every block's
//!   scales and mins are chosen first from the *original* rows by llama.cpp's encoder for the
//!   type — importance-weighted by diag(H) when `weighted` (exactly `llama-quantize --imatrix`'s
//!   choice), its reference encoder otherwise — and stored as the format stores them (fp16
//!   d/dmin, 6-bit k-quant sub-scales); then the columns are swept by descending diag(H), each
//!   fixed to the nearest value its block's grid decodes to (`quant::ggml::BlockGrid`) and its
//!   error propagated. llama.cpp's blocks are contiguous along a row, so the order cannot group
//!   columns by block; fixing the grids first keeps every block intact whatever the order.
//! * **columns** (`act_order: false`): stored column order; at the first column of each ggml
//!   block (32 or 256 columns) the block's scales are chosen from the row's *current* (already
//!   compensated) values, each column fixed to that grid, the codes written at the block's last
//!   column. The lazy-update block is a multiple of the ggml block, so every column of a block
//!   is up to date when its scales are chosen.
//!
//! The sweep is greedy (the paper's own caveat); on the layer's objective tr(ΔW H ΔWᵀ) the
//! result is compared with llama.cpp's rounding of the same rows and the better one kept, so a
//! linear is never worse than `llama-quantize` (with `--imatrix` when `weighted`) on its
//! calibration data.
//!
//! Which type each linear gets is the GGUF export's: llama-quantize's mix for `gguf_type`
//! (`q4_k_m` gives attn_v and ffn_down of some layers Q6_K, …) and `tensor_types` overrides,
//! both taken from the pipeline's `export:` block when it is a GGUF export. The linear keeps the
//! blocks (`Linear::set_ggml`, refused unless they decode to exactly its weight), and the GGUF
//! exporter writes them as they are.

use super::harness::{Done, PerLinear, Schedule};
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use crate::formats::gguf::{self, FileType, Overrides, TypeOverride};
use crate::model::layer::GgmlCodes;
use crate::quant::ggml::{self, BlockGrid, GgmlType};
use anyhow::{bail, Context, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::sweep::{self, ColumnRule, Factor};

/// A GGUF export of the pipeline as the sweep sees it: its mix and per-tensor overrides.
pub type GgufExport = (Option<FileType>, Vec<TypeOverride>);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptqGgmlSpec {
    /// llama.cpp's mix (`q4_k_m`, `q4_0`, …); default: the GGUF export's `gguf_type`.
    #[serde(default)]
    pub gguf_type: Option<FileType>,
    /// Per-tensor types (`--tensor-type`); default: the GGUF export's `tensor_types`.
    #[serde(default)]
    pub tensor_types: Option<Vec<TypeOverride>>,
    /// Dampening of H, as a fraction of its mean diagonal (GPTQ's λ).
    #[serde(default = "d_damp")]
    pub damp: f64,
    /// Choose each block's scales with llama.cpp's importance-weighted encoder, weights diag(H)
    /// (as `--imatrix`); `false`: its reference (unweighted) encoder.
    #[serde(default = "d_true")]
    pub weighted: bool,
    /// Static activation order (`Order::Static`): block scales from the original weights,
    /// columns by descending diag(H); `false`: stored column order, scales from the compensated
    /// weights at each block (`Order::Columns`).
    #[serde(default = "d_true")]
    pub act_order: bool,
    #[serde(default = "super::default_targets")]
    pub targets: Vec<String>,
    #[serde(default = "super::default_ignore")]
    pub ignore: Vec<String>,
}

fn d_damp() -> f64 {
    0.01
}
fn d_true() -> bool {
    true
}

impl GptqGgmlSpec {
    pub fn validate(&self) -> Result<()> {
        if !(self.damp > 0.0 && self.damp < 1.0) {
            bail!("field `damp` must be in (0, 1), found {}", self.damp);
        }
        if let Some(t) = &self.tensor_types {
            Overrides::new(t).context("field `tensor_types`")?;
        }
        super::select::Selector::new(&self.targets, &self.ignore)?;
        Ok(())
    }

    /// Take the GGUF export's mix and overrides where the pass names none (one GGUF export at
    /// most: the codes it keeps are one mix's).
    pub fn bind_exports(&mut self, exports: &[GgufExport]) -> Result<()> {
        if exports.len() > 1 {
            bail!(
                "sweeps onto one GGUF mix, but `export` lists {} GGUF exports: keep one",
                exports.len()
            );
        }
        let (t, o) = exports.first().cloned().unwrap_or_default();
        self.resolve(t, &o)
    }

    /// Take the GGUF export's mix and overrides where the pass names none; refuse a pass whose
    /// grid differs from what the export will write.
    pub fn resolve(
        &mut self,
        export_type: Option<FileType>,
        export_overrides: &[TypeOverride],
    ) -> Result<()> {
        match (self.gguf_type, export_type) {
            (None, Some(t)) => self.gguf_type = Some(t),
            (Some(a), Some(b)) if a != b => bail!(
                "field `gguf_type` is {} but the export writes {}: the sweep must target the grid the file stores",
                a.name(),
                b.name()
            ),
            (None, None) => bail!(
                "missing field `gguf_type` (the GGUF mix to sweep onto; taken from `export` when it is `format: gguf`)"
            ),
            _ => {}
        }
        match (&self.tensor_types, export_type) {
            (None, Some(_)) => self.tensor_types = Some(export_overrides.to_vec()),
            (Some(a), Some(_)) if a.as_slice() != export_overrides => bail!(
                "field `tensor_types` differs from the export's `tensor_types`: the sweep must target the grid the file stores"
            ),
            _ => {}
        }
        Ok(())
    }
}

/// What the sweep of one linear produced.
pub struct GgmlResult {
    /// The encoded rows (row-major blocks), rows in the input's order.
    pub bytes: Vec<u8>,
    /// Their decoding [rows, cols] (bit for bit what a reader of the file computes with).
    pub dequant: Array2<f32>,
    /// Σ e² of the sweep (the paper's objective up to ½).
    pub loss: f64,
    pub damp: f64,
    /// `false` when llama.cpp's own rounding of the rows (importance-weighted when `weighted`)
    /// had the lower output error tr(ΔW H ΔWᵀ) than the sweep, and was kept instead.
    pub swept: bool,
    /// tr(ΔW H ΔWᵀ) of the result against the given weight and Hessian.
    pub output_error: f64,
}

/// How the sweep orders its columns and when it fixes the block grids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Stored column order; each block's scales from the compensated weights at its first
    /// column.
    Columns,
    /// Static activation order (llm-compressor's `actorder: static`, GPTQModel's
    /// `static_groups`): every block's scales chosen first from the original weights — the
    /// encoder's own choice for the whole row, importance-weighted when `weighted` —, then the
    /// columns swept by descending diag(H), each fixed onto the grid of the block it sits in.
    Static,
}

/// GPTQ of `w` [rows, cols] with Hessian `h` onto ggml type `ty` (cols a multiple of its
/// block size).
pub fn gptq_ggml(
    w: &Array2<f32>,
    h: &Array2<f64>,
    ty: GgmlType,
    damp: f64,
    weighted: bool,
    order: Order,
) -> Result<GgmlResult> {
    let (rows, cols) = w.dim();
    if h.dim() != (cols, cols) {
        bail!("Hessian is {:?}, expected [{cols}, {cols}]", h.dim());
    }
    let bs = ty.block_size();
    if ggml::levels(ty) == 0 || !cols.is_multiple_of(bs) {
        bail!(
            "{} rows of {cols} are not whole {}-element {} blocks",
            rows,
            bs,
            ty.name()
        );
    }
    let (w_in, h_in) = (w, h);
    let dead = (0..cols).any(|j| h_in[[j, j]] == 0.0);
    let mut w = w.clone();
    let mut h = h.clone();
    sweep::fix_dead_inputs(&mut w, &mut h);
    // the importance of each column for the block encoder: diag(H) (llama-imatrix's mean x²
    // up to a constant factor, which the weighted encoders do not see)
    let qw: Vec<f32> = (0..cols).map(|j| h[[j, j]] as f32).collect();
    let qw = weighted.then_some(qw.as_slice());
    // llama.cpp's rounding of the given rows, the sweep's point of comparison (step 4)
    let ws_in = w_in.as_standard_layout();
    let ws_in = ws_in.as_slice().context("standard layout")?;
    let rounded = encode(ty, ws_in, cols, qw)?;
    let (bytes, fixed, loss, damp) = match order {
        Order::Columns => sweep_columns(&w, &h, ty, damp, qw)?,
        Order::Static => {
            // the static grids are that same rounding unless dead inputs were zeroed
            let grids = if dead {
                let ws = w.as_standard_layout();
                encode(ty, ws.as_slice().context("standard layout")?, cols, qw)?
            } else {
                rounded.clone()
            };
            sweep_static(&w, &h, ty, damp, &grids)?
        }
    };
    let dec = ggml::dequantize(ty, &bytes, rows * cols)?;
    // the sweep's fixed values are the grid's decoded values, bit for bit
    if let Some(i) = dec
        .iter()
        .zip(&fixed)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        bail!(
            "internal: {} block decodes to {} at ({}, {}), the sweep fixed {}",
            ty.name(),
            dec[i],
            i / cols,
            i % cols,
            fixed[i]
        );
    }
    // 4. the sweep is greedy: on the layer's own objective tr(ΔW H ΔWᵀ) it is kept only when
    // it beats llama.cpp's rounding of the same rows (where it does not, that rounding is
    // written — the file is then llama-quantize's, with or without --imatrix)
    let dec = Array2::from_shape_vec((rows, cols), dec)?;
    let base = Array2::from_shape_vec((rows, cols), ggml::dequantize(ty, &rounded, rows * cols)?)?;
    let e_sweep = crate::linalg::quad_trace(&(w_in - &dec), h_in);
    let e_base = crate::linalg::quad_trace(&(w_in - &base), h_in);
    let swept = e_sweep <= e_base;
    let (bytes, dequant, output_error) = if swept {
        (bytes, dec, e_sweep)
    } else {
        (rounded, base, e_base)
    };
    Ok(GgmlResult {
        bytes,
        dequant,
        loss,
        damp,
        swept,
        output_error,
    })
}

/// llama.cpp's encoding of `x` (rows of `n_per_row`) as `ty`: importance-weighted by `qw`
/// (`--imatrix`) when given, its reference encoder otherwise.
fn encode(ty: GgmlType, x: &[f32], n_per_row: usize, qw: Option<&[f32]>) -> Result<Vec<u8>> {
    match qw {
        Some(qw) => ggml::quantize_weighted(ty, x, n_per_row, qw),
        None => ggml::quantize(ty, x),
    }
}

/// (bytes, fixed values row-major in stored column order, Σ e², damp used)
type Swept = (Vec<u8>, Vec<f32>, f64, f64);

fn sweep_columns(
    w: &Array2<f32>,
    h: &Array2<f64>,
    ty: GgmlType,
    damp: f64,
    qw: Option<&[f32]>,
) -> Result<Swept> {
    let (rows, cols) = w.dim();
    let bs = ty.block_size();
    let f = Factor::new(h, damp)?;
    let rule = GgmlRule { ty, qw };
    let mut states: Vec<GgmlRow> = (0..rows)
        .map(|_| GgmlRow {
            grid: None,
            bytes: Vec::with_capacity(cols / bs * ty.type_size()),
            err: None,
        })
        .collect();
    let mut wv = w
        .as_standard_layout()
        .into_owned()
        .into_raw_vec_and_offset()
        .0;
    // a lazy-update block that holds whole ggml blocks
    let block = 128usize.div_ceil(bs) * bs;
    let loss = sweep::sweep(&mut wv, cols, &f, block, &rule, &mut states);
    let mut bytes = Vec::with_capacity(rows * cols / bs * ty.type_size());
    for (r, st) in states.into_iter().enumerate() {
        if let Some(e) = st.err {
            bail!("row {r}: {e}");
        }
        bytes.extend(st.bytes);
    }
    Ok((bytes, wv, loss.iter().sum(), f.damp))
}

fn sweep_static(
    w: &Array2<f32>,
    h: &Array2<f64>,
    ty: GgmlType,
    damp: f64,
    grids: &[u8],
) -> Result<Swept> {
    let (rows, cols) = w.dim();
    let (bs, ts) = (ty.block_size(), ty.type_size());
    // 1. every block's scales and mins: llama.cpp's encoding of the original rows (`grids`)
    let mut states = grids
        .chunks(cols / bs * ts)
        .map(|row| {
            row.chunks(ts)
                .map(|b| BlockGrid::new(ty, b))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    // 2. columns by descending diag(H), each onto its own block's grid
    let perm = sweep::act_order(h);
    let (mut wp, hp) = sweep::permute(w, h, &perm);
    let f = Factor::new(&hp, damp)?;
    let rule = StaticRule { perm: &perm, bs };
    let loss = sweep::sweep(&mut wp, cols, &f, 128, &rule, &mut states);
    // 3. the codes into the blocks' bytes; the fixed values back in stored order
    let bytes: Vec<u8> = states
        .into_iter()
        .flatten()
        .flat_map(BlockGrid::finish)
        .collect();
    let mut fixed = vec![0f32; rows * cols];
    for (out, wr) in fixed.chunks_mut(cols).zip(wp.chunks(cols)) {
        for (k, &j) in perm.iter().enumerate() {
            out[j] = wr[k];
        }
    }
    Ok((bytes, fixed, loss.iter().sum(), f.damp))
}

struct StaticRule<'a> {
    /// sweep position → stored column
    perm: &'a [usize],
    bs: usize,
}

impl ColumnRule for StaticRule<'_> {
    type Row = Vec<BlockGrid>;
    type Block = ();

    fn begin_block(&self, _: usize, _: usize, _: &[f32], _: &Factor) {}

    fn column(
        &self,
        _: &(),
        grids: &mut Vec<BlockGrid>,
        _: usize,
        i: usize,
        wr: &[f32],
        _: &Factor,
    ) -> f32 {
        let j = self.perm[i];
        grids[j / self.bs].fix(j % self.bs, wr[i])
    }
}

struct GgmlRule<'a> {
    ty: GgmlType,
    qw: Option<&'a [f32]>,
}

struct GgmlRow {
    grid: Option<BlockGrid>,
    bytes: Vec<u8>,
    err: Option<String>,
}

impl GgmlRule<'_> {
    /// Step 1: the grid of the block starting at column `i`, from the row's current values.
    fn open(&self, i: usize, wr: &[f32]) -> Result<BlockGrid> {
        let bs = self.ty.block_size();
        let x = &wr[i..i + bs];
        let enc = encode(self.ty, x, bs, self.qw.map(|qw| &qw[i..i + bs]))?;
        BlockGrid::new(self.ty, &enc)
    }
}

impl ColumnRule for GgmlRule<'_> {
    type Row = GgmlRow;
    type Block = ();

    fn begin_block(&self, _: usize, _: usize, _: &[f32], _: &Factor) {}

    fn column(&self, _: &(), st: &mut GgmlRow, _: usize, i: usize, wr: &[f32], _: &Factor) -> f32 {
        let bs = self.ty.block_size();
        if i.is_multiple_of(bs) {
            match self.open(i, wr) {
                Ok(g) => st.grid = Some(g),
                Err(e) => {
                    st.err.get_or_insert(e.to_string());
                    st.grid = None;
                }
            }
        }
        let Some(g) = st.grid.as_mut() else {
            return wr[i];
        };
        // step 2: the nearest value of the block's grid
        let v = g.fix(i % bs, wr[i]);
        if i % bs == bs - 1 {
            // step 3: the block's codes into its bytes
            if let Some(g) = st.grid.take() {
                st.bytes.extend(g.finish());
            }
        }
        v
    }
}

pub struct GptqGgml {
    spec: GptqGgmlSpec,
    ft: FileType,
    overrides: Overrides,
    select: super::select::Selector,
}

impl GptqGgml {
    pub fn new(spec: &GptqGgmlSpec) -> Result<Self> {
        spec.validate()?;
        let ft = spec
            .gguf_type
            .context("internal: gptq_ggml's `gguf_type` was not resolved from the export")?;
        Ok(GptqGgml {
            spec: spec.clone(),
            ft,
            overrides: Overrides::new(spec.tensor_types.as_deref().unwrap_or_default())?,
            select: super::select::Selector::new(&spec.targets, &spec.ignore)?,
        })
    }
}

impl GptqGgml {
    fn order(&self) -> Order {
        if self.spec.act_order {
            Order::Static
        } else {
            Order::Columns
        }
    }
}

impl Pass for GptqGgml {
    fn name(&self) -> String {
        "gptq_ggml".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            hessian: true,
            ..Default::default()
        }
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        // every linear's Hessian from the layer's inputs, one forward (as `gptq` by default)
        let harness = PerLinear {
            pass: "gptq_ggml",
            select: &self.select,
            schedule: Schedule::OneForward,
        };
        harness.each(ctx, |ctx, l| {
            let lin = &ctx.layer.linears[l.name];
            if lin.mask().is_some() || lin.quant().is_some() || lin.adapter().is_some() {
                bail!("gptq_ggml sweeps dense weights; this linear is already pruned, quantized or adapted");
            }
            let cols = lin.weight().ncols();
            let gname = gguf::gguf_name(&format!("{}.weight", l.module))
                .context("no GGUF tensor name (llama architecture)")?;
            let ty = gguf::tensor_type(
                self.ft,
                &gname,
                cols,
                gguf::MixModel::of(ctx.config),
                true, // calibrated: llama-quantize's mix with an importance matrix
                &self.overrides,
            );
            if ggml::levels(ty) == 0 {
                return Ok(Done::skipped()); // a float type in this mix: nothing to round
            }
            let h = super::hessian_or_identity(
                ctx,
                l.name,
                "quantized without a Hessian (identity)",
            )?;
            let lin = &ctx.layer.linears[l.name];
            let r = gptq_ggml(
                lin.weight(),
                &h,
                ty,
                self.spec.damp,
                self.spec.weighted,
                self.order(),
            )
            .with_context(|| format!("GPTQ onto {}", ty.name()))?;
            // relative output error, the sweep's tr(ΔW H ΔWᵀ) over tr(W H Wᵀ)
            let total = crate::linalg::quad_trace(lin.weight(), &h);
            let rel = if total > 0.0 {
                r.output_error / total
            } else {
                0.0
            };
            let lin = ctx.layer.linears.get_mut(l.name).context("linear present")?;
            lin.set_weight(r.dequant)?;
            lin.set_ggml(GgmlCodes { ty, bytes: r.bytes })?;
            Ok(Done {
                error: Some(rel),
                loss: Some(r.loss),
                damp: Some((self.spec.damp, r.damp)),
                ..Default::default()
            }
            .note("type", ty.name())
            .note("order", format!("{:?}", self.order()))
            .note("kept", if r.swept { "sweep" } else { "rounding" }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::correlated_problem;

    /// Every block-quantized ggml type.
    fn types() -> impl Iterator<Item = GgmlType> {
        ggml::ALL_TYPES.into_iter().filter(|t| t.is_quantized())
    }

    #[test]
    fn with_an_identity_hessian_it_is_llama_cpps_rounding_to_the_nearest_stored_value() {
        // H = I: no error moves to other columns, so every block gets llama-quantize's scales
        // and mins (same bytes with the codes blanked). Its codes are rounded against the f32
        // scale before the fp16 rounding it stores; ours are the nearest *stored* values: the
        // codes may differ by one level in near-ties (under 2%: Q8_0 has the finest steps),
        // never with a larger error.
        let (w, _) = correlated_problem(8, 512, 16, 3, false);
        let w = w.mapv(|x| x * 0.05);
        let ws = w.as_slice().unwrap();
        let h = Array2::from_diag(&ndarray::Array1::from_elem(512, 1.0));
        for (ty, order) in types().flat_map(|t| [(t, Order::Columns), (t, Order::Static)]) {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let r = gptq_ggml(&w, &h, ty, 0.01, false, order).unwrap();
            let want = ggml::quantize(ty, ws).unwrap();
            let theirs = ggml::dequantize(ty, &want, ws.len()).unwrap();
            let ours = r.dequant.as_slice().unwrap();
            let mut differ = 0;
            for (bi, (a, b)) in r.bytes.chunks(ts).zip(want.chunks(ts)).enumerate() {
                let (mut ca, mut cb) = (vec![0u8; bs], vec![0u8; bs]);
                ggml::unpack_codes(ty, a, &mut ca);
                ggml::unpack_codes(ty, b, &mut cb);
                let (mut pa, mut pb) = (a.to_vec(), b.to_vec());
                ggml::pack_codes(ty, &mut pa, &vec![0u8; bs]);
                ggml::pack_codes(ty, &mut pb, &vec![0u8; bs]);
                assert_eq!(pa, pb, "{ty:?} block {bi}: scales and mins");
                for i in 0..bs {
                    let k = bi * bs + i;
                    if ca[i] != cb[i] {
                        differ += 1;
                        assert!((ca[i] as i32 - cb[i] as i32).abs() == 1, "{ty:?} {k}");
                        assert!(
                            (ours[k] - ws[k]).abs() <= (theirs[k] - ws[k]).abs(),
                            "{ty:?} {k}"
                        );
                    }
                }
            }
            assert!(differ * 50 <= ws.len(), "{ty:?}: {differ} codes differ");
        }
    }

    #[test]
    fn compensation_lowers_the_output_error_below_rounding() {
        // correlated inputs: GPTQ's output error tr(ΔW H ΔWᵀ) below llama.cpp's RTN and
        // imatrix-weighted RTN on the same grid, for every type
        let (w, h) = correlated_problem(16, 512, 2048, 7, true);
        let w = w.mapv(|x| x * 0.05);
        let ws = w.as_slice().unwrap();
        let diag: Vec<f32> = (0..512).map(|j| h[[j, j]] as f32).collect();
        let err = |d: &[f32]| {
            let dw = Array2::from_shape_fn((16, 512), |(r, c)| w[[r, c]] - d[r * 512 + c]);
            crate::linalg::quad_trace(&dw, &h)
        };
        for ty in types() {
            let rtn = ggml::dequantize(ty, &ggml::quantize(ty, ws).unwrap(), ws.len()).unwrap();
            let imx = ggml::dequantize(
                ty,
                &ggml::quantize_weighted(ty, ws, 512, &diag).unwrap(),
                ws.len(),
            )
            .unwrap();
            for order in [Order::Columns, Order::Static] {
                let g = gptq_ggml(&w, &h, ty, 0.01, true, order).unwrap();
                let (e_rtn, e_imx, e_g) =
                    (err(&rtn), err(&imx), err(g.dequant.as_slice().unwrap()));
                assert!(
                    e_g < e_rtn && e_g < e_imx,
                    "{ty:?} {order:?}: gptq {e_g:.4e}, rtn {e_rtn:.4e}, imatrix {e_imx:.4e}"
                );
            }
        }
    }

    #[test]
    fn static_order_keeps_the_importance_weighted_encoders_scales() {
        // the block parameters of a static sweep are llama-quantize --imatrix's for the
        // original rows (weights diag H) byte for byte; only the codes move
        let (w, h) = correlated_problem(8, 512, 2048, 9, true);
        let w = w.mapv(|x| x * 0.05);
        let ws = w.as_slice().unwrap();
        let diag: Vec<f32> = (0..512).map(|j| h[[j, j]] as f32).collect();
        for ty in types() {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let want = ggml::quantize_weighted(ty, ws, 512, &diag).unwrap();
            let g = gptq_ggml(&w, &h, ty, 0.01, true, Order::Static).unwrap();
            let mut moved = 0;
            for (a, b) in g.bytes.chunks(ts).zip(want.chunks(ts)) {
                let (mut pa, mut pb) = (a.to_vec(), b.to_vec());
                ggml::pack_codes(ty, &mut pa, &vec![0u8; bs]);
                ggml::pack_codes(ty, &mut pb, &vec![0u8; bs]);
                assert_eq!(pa, pb, "{ty:?}: scales and mins");
                moved += usize::from(a != b);
            }
            assert!(moved > 0, "{ty:?}: the sweep changed no code");
        }
    }

    #[test]
    fn the_result_is_never_worse_than_llama_cpps_rounding_on_the_layer_objective() {
        // weakly correlated, few-sample Hessians (where a greedy sweep can lose): the kept
        // result's tr(ΔW H ΔWᵀ) is at most the rounding's, and when the rounding is kept its
        // bytes are exactly llama.cpp's
        for seed in 0..4 {
            let (w, h) = correlated_problem(8, 256, 48, 20 + seed, seed % 2 == 0);
            let w = w.mapv(|x| x * 0.05);
            let ws = w.as_slice().unwrap();
            let diag: Vec<f32> = (0..256).map(|j| h[[j, j]] as f32).collect();
            let err = |d: &Array2<f32>| crate::linalg::quad_trace(&(&w - d), &h);
            for ty in types() {
                for (weighted, order) in [(true, Order::Static), (false, Order::Columns)] {
                    let rounded = if weighted {
                        ggml::quantize_weighted(ty, ws, 256, &diag).unwrap()
                    } else {
                        ggml::quantize(ty, ws).unwrap()
                    };
                    let base = Array2::from_shape_vec(
                        (8, 256),
                        ggml::dequantize(ty, &rounded, ws.len()).unwrap(),
                    )
                    .unwrap();
                    let g = gptq_ggml(&w, &h, ty, 0.01, weighted, order).unwrap();
                    assert!(
                        err(&g.dequant) <= err(&base),
                        "{ty:?} {order:?} seed {seed}"
                    );
                    if !g.swept {
                        assert_eq!(g.bytes, rounded, "{ty:?} {order:?} seed {seed}");
                    }
                }
            }
        }
    }

    #[test]
    fn rows_that_are_not_whole_blocks_are_refused() {
        let w = Array2::<f32>::zeros((2, 48));
        let h = Array2::from_diag(&ndarray::Array1::from_elem(48, 1.0));
        for order in [Order::Columns, Order::Static] {
            assert!(gptq_ggml(&w, &h, GgmlType::Q4_0, 0.01, true, order).is_err());
            assert!(gptq_ggml(&w, &h, GgmlType::F16, 0.01, true, order).is_err());
        }
    }
}
