//! The tunable parameters of a block (norms, scales, zero points, factors, biases) and their
//! gradients in the same layout: the values distillation reads and writes.

use crate::model::layer::{LayerWeights, Repr};
use serde::{Deserialize, Serialize};

/// The groups of continuous parameters distillation can tune.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Norms,
    Scales,
    Zeros,
    Factors,
    Biases,
}

/// Which tensor of its owner a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// An RMSNorm weight (owner: the norm's name).
    Norm,
    Bias,
    Scales,
    /// Zero points as reals (the forward rounds them).
    Zeros,
    /// Low-rank factor U [out, r].
    U,
    /// Low-rank factor V [r, in].
    V,
}

impl Field {
    pub fn group(&self) -> Group {
        match self {
            Field::Norm => Group::Norms,
            Field::Bias => Group::Biases,
            Field::Scales => Group::Scales,
            Field::Zeros => Group::Zeros,
            Field::U | Field::V => Group::Factors,
        }
    }
}

/// One tunable tensor: `owner` is a norm name or a linear name (`mlp.down_proj`).
#[derive(Clone, Debug)]
pub struct Param {
    pub owner: String,
    pub field: Field,
    pub values: Vec<f32>,
}

/// The tunable tensors of a block, in a fixed order (norms by name, then linears by name and
/// field), and — with the same layout — their gradients.
#[derive(Clone, Debug, Default)]
pub struct Params {
    pub list: Vec<Param>,
}

impl Params {
    /// The current values of the groups in `groups` that `layer` has (a dense linear has no
    /// scales, a symmetric or sparse one no tunable zero points, only factored linears have
    /// factors; quantized factors and per-tensor grids stay fixed).
    pub fn of(layer: &LayerWeights, groups: &[Group]) -> Params {
        let has = |g| groups.contains(&g);
        let mut list = Vec::new();
        if has(Group::Norms) {
            for (n, (v, _)) in &layer.norms {
                list.push(Param {
                    owner: n.clone(),
                    field: Field::Norm,
                    values: v.clone(),
                });
            }
        }
        for (name, lin) in &layer.linears {
            let mut push = |field, values: Vec<f32>| {
                list.push(Param {
                    owner: name.clone(),
                    field,
                    values,
                })
            };
            if has(Group::Biases) {
                if let Some(b) = &lin.bias {
                    push(Field::Bias, b.clone());
                }
            }
            // a per-tensor grid has one scale for the whole matrix: left as it is
            let per_row = |q: &crate::quant::QuantizedLinear| {
                q.args.strategy != crate::quant::Strategy::Tensor
            };
            if let Some(q) = lin.quant().filter(|q| per_row(q)) {
                if has(Group::Scales) {
                    push(Field::Scales, q.scales.clone());
                }
                if let (true, Some(z), None) = (has(Group::Zeros), &q.zeros, lin.mask()) {
                    push(Field::Zeros, z.iter().map(|&z| z as f32).collect());
                }
            }
            if let (true, Repr::Factored { u, v }) = (has(Group::Factors), lin.repr()) {
                if u.quant.is_none() && v.quant.is_none() {
                    push(Field::U, u.values.iter().copied().collect());
                    push(Field::V, v.values.iter().copied().collect());
                }
            }
        }
        Params { list }
    }

    pub fn get(&self, owner: &str, field: Field) -> Option<&[f32]> {
        self.list
            .iter()
            .find(|p| p.owner == owner && p.field == field)
            .map(|p| p.values.as_slice())
    }

    pub(super) fn index(&self, owner: &str, field: Field) -> Option<usize> {
        self.list
            .iter()
            .position(|p| p.owner == owner && p.field == field)
    }

    /// Zeros of the same layout (a gradient accumulator).
    pub fn zeros_like(&self) -> Params {
        Params {
            list: self
                .list
                .iter()
                .map(|p| Param {
                    owner: p.owner.clone(),
                    field: p.field,
                    values: vec![0.0; p.values.len()],
                })
                .collect(),
        }
    }

    /// self += other (same layout), elementwise in a fixed order.
    pub fn add(&mut self, other: &Params) {
        for (a, b) in self.list.iter_mut().zip(&other.list) {
            a.values
                .iter_mut()
                .zip(&b.values)
                .for_each(|(a, b)| *a += b);
        }
    }

    /// Number of scalar parameters.
    pub fn len(&self) -> usize {
        self.list.iter().map(|p| p.values.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
