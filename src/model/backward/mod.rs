//! The decoder block's backward pass, beside the forward it mirrors (`llama.rs`, `ops.rs`,
//! `attention.rs`): given the block input X and ∂L/∂Y at its output, the gradient with respect
//! to X and to the block's *continuous* parameters — what block-wise distillation (`passes/kd.rs`)
//! tunes while the integer codes, masks and dense weights stay fixed:
//!
//! * RMSNorm weights (`input_layernorm`, `post_attention_layernorm`, Qwen3's q/k norms);
//! * linear biases;
//! * quantization scales s and, for asymmetric grids, zero points z of W = (Q − z)·s, with the
//!   integer codes Q held fixed and z rounded to an integer in the forward (straight-through:
//!   ∂round(z)/∂z := 1);
//! * the two factors of a low-rank linear, W = U·V.
//!
//! A sparse linear keeps its mask: its masked codes dequantize to 0 for any scale, and its
//! zero points are not tunable (moving them would un-prune). An activation quantizer on a
//! linear's input (W8A8) is passed straight through for ∂L/∂X.
//!
//! The block (transformers' `LlamaDecoderLayer`):
//!
//!   h₁ = RMSNorm(x; γ₁)                       RMSNorm(x)ᵢ = γᵢ·xᵢ·ρ, ρ = (mean(x²) + ε)^{-1/2}
//!   q, k, v = h₁W_qᵀ(+b), h₁W_kᵀ(+b), h₁W_vᵀ(+b);   Qwen3: q, k ← RMSNorm per head
//!   q̃, k̃ = RoPE(q), RoPE(k)                  (rotate-half)
//!   A = softmax(q̃k̃ᵀ/√d + causal) v           (GQA: head h reads kv group h / (n_h/n_kv))
//!   r = x + A W_oᵀ
//!   h₂ = RMSNorm(r; γ₂)
//!   y = r + (silu(h₂W_gᵀ) ⊙ h₂W_uᵀ) W_dᵀ
//!
//! and its adjoints, each written next to the step it reverses in [`backward`]:
//!
//!   linear  y = xWᵀ + b:   ∂x = ∂y W,  ∂W = ∂yᵀx,  ∂b = Σ_rows ∂y
//!           W = U V:       ∂U = ∂yᵀ(xVᵀ),  ∂V = (∂y U)ᵀ x,  ∂x = (∂y U) V
//!           W = (Q − z)s:  ∂s_{rg} = Σ_{j∈g} ∂W_{rj}(Q_{rj} − z_{rg}),  ∂z_{rg} = −s_{rg} Σ_{j∈g} ∂W_{rj}
//!   RMSNorm: ∂γ = Σ_rows ∂h ⊙ x ρ,   ∂x = ρ(γ⊙∂h) − x ρ³ ⟨γ⊙∂h, x⟩ / d
//!   RoPE:    the transpose of the rotation (rotate by −θ)
//!   softmax attention (per head):  P = softmax(S), O = P V:
//!           ∂V = Pᵀ∂O,  ∂P = ∂O Vᵀ,  ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)),  ∂Q = ∂S K/√d,  ∂K = ∂Sᵀ Q/√d
//!   SwiGLU:  a = silu(g)·u:  ∂u = ∂a silu(g),  ∂g = ∂a u σ(g)(1 + g(1 − σ(g)))
//!
//! The forward here runs the same kernels as the model's forward, so on unchanged parameters
//! it computes the same block output (tested); the backward is checked against central finite
//! differences for every parameter group.

mod adjoints;
mod block;
mod eff;
mod params;
#[cfg(test)]
pub(crate) mod tests;

pub use adjoints::causal_attention_backward;
pub use block::{Block, Tape};
pub use params::{Field, Group, Param, Params};
