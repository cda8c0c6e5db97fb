//! Round-to-nearest: w_q = s · (clamp(round(w/s) + z) − z) with min-max (or MSE-searched)
//! ranges per group, channel or tensor. No calibration; the baseline every report compares to.

use super::Scheme;
use crate::engine::stats::StatsRequest;
use crate::engine::{LayerCtx, LinearRecord, Pass};
use crate::quant::scale_dtype_for;
use crate::quant::QuantArgs;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::time::Instant;

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
        let names: Vec<&str> = ctx
            .config
            .block()
            .linear_names()
            .filter(|n| self.select.selects_in(ctx, n))
            .collect();
        let globals = if self.args.global_scale {
            super::fused_global_scales(ctx, &names)?
        } else {
            Default::default()
        };
        for name in names {
            let module = ctx.module_name(name);
            let t = Instant::now();
            let lin = ctx
                .layer
                .linears
                .get_mut(name)
                .expect("all linears present");
            if let Some(a) = &self.act {
                a.check_width(lin.shape().1)
                    .map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
            }
            let dtype = scale_dtype_for(lin.dtype);
            let q = round_to_nearest(lin.weight(), &self.args, dtype, globals.get(name).copied())
                .map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
            lin.set_quantized(q)
                .map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
            lin.set_act_quant(self.act);
            ctx.records
                .push(LinearRecord::new(ctx.index(), name, "rtn", t));
        }
        Ok(())
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
