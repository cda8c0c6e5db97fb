//! Round-to-nearest: w_q = s · (clamp(round(w/s) + z) − z) with min-max (or MSE-searched)
//! ranges per group, channel or tensor. No calibration; the baseline every report compares to.

use super::harness::{Done, PerLinear, Schedule};
use super::Scheme;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, Pass};
use crate::quant::scale_dtype_for;
use crate::quant::QuantArgs;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtnSpec {
    #[serde(flatten)]
    pub scheme: Scheme,
}

pub struct Rtn {
    args: QuantArgs,
    act: Option<crate::model::layer::ActQuant>,
    select: super::select::Selector,
}

impl RtnSpec {
    pub fn validate(&self) -> Result<()> {
        self.scheme.act_quant()?;
        self.scheme.args()?.validate()
    }
}

impl Rtn {
    pub fn new(spec: &RtnSpec) -> Result<Self> {
        Ok(Rtn {
            args: spec.scheme.args()?,
            act: spec.scheme.act_quant()?,
            select: spec.scheme.selector()?,
        })
    }
}

impl Pass for Rtn {
    fn name(&self) -> String {
        "rtn".into()
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest::default()
    }

    fn apply(&self, ctx: &mut LayerCtx) -> Result<()> {
        let harness = PerLinear {
            pass: "rtn",
            select: &self.select,
            schedule: Schedule::Weights,
        };
        let globals = if self.args.global_scale {
            super::fused_global_scales(ctx, &harness.selected(ctx))?
        } else {
            Default::default()
        };
        harness.each(ctx, |ctx, l| {
            let lin = ctx
                .layer
                .linears
                .get_mut(l.name)
                .context("linear present")?;
            if let Some(a) = &self.act {
                a.check_width(lin.shape().1)?;
            }
            let dtype = scale_dtype_for(lin.dtype);
            let global = globals.get(l.name).copied();
            let q = round_to_nearest(lin.weight(), &self.args, dtype, global)?;
            lin.set_quantized(q)?;
            lin.set_act_quant(self.act);
            Ok(Done::default())
        })
    }
}

/// Round-to-nearest onto the grid of `args` (integer or float; `global`: NVFP4's global scale),
/// scales in `dtype`: the whole method, and the fallback of the Hessian methods for an expert
/// no calibration token reached.
pub(crate) fn round_to_nearest(
    w: &ndarray::Array2<f32>,
    args: &crate::quant::QuantArgs,
    dtype: crate::safetensors_file::DType,
    global: Option<f32>,
) -> Result<crate::quant::QuantizedLinear> {
    match args.float {
        Some(_) => crate::quant::float::quantize(w.view(), args, dtype, global),
        None => crate::backend::rtn(w.view(), args, dtype),
    }
}
