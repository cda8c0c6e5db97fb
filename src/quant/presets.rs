//! Named schemes, as compressed-tensors' `PRESET_SCHEMES` defines them: a scheme is data — the
//! weights' quantization arguments and, for schemes that quantize activations too, the inputs'
//! (always dynamic here: computed from each token or group at run time).
//!
//! Adding a scheme is one entry below (and, if it needs a new grid, its quantizer in
//! `quant/`). Schemes whose activations need a calibrated static scale (`FP8`, `NVFP4`) are not
//! listed yet: the pipeline refuses them by name.

use super::{Observer, QuantArgs, Strategy};
use crate::number::{FloatFormat, ScaleType};

/// One named scheme.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub weights: QuantArgs,
    /// Dynamic input-activation quantization (strategy `Token` or `Group`), if any.
    pub input: Option<QuantArgs>,
}

fn int(bits: u32, symmetric: bool, strategy: Strategy, group: usize) -> QuantArgs {
    QuantArgs::int(bits, symmetric, strategy, group, Observer::MinMax)
}

fn float(
    format: FloatFormat,
    strategy: Strategy,
    group: usize,
    scale_type: Option<ScaleType>,
    global_scale: bool,
    block: Option<[usize; 2]>,
) -> QuantArgs {
    QuantArgs {
        bits: format.bits(),
        symmetric: true,
        strategy,
        group_size: group,
        observer: Observer::MinMax,
        float: Some(format),
        scale_type,
        global_scale,
        block,
    }
}

/// FP8 E4M3 weights per channel / tensor / block, scales in the weights' dtype.
fn fp8(strategy: Strategy, block: Option<[usize; 2]>) -> QuantArgs {
    float(FloatFormat::E4M3, strategy, 0, None, false, block)
}

/// Microscaling: groups of 32 under E8M0 scales.
fn mx(format: FloatFormat) -> QuantArgs {
    float(
        format,
        Strategy::Group,
        32,
        Some(ScaleType::E8M0),
        false,
        None,
    )
}

/// Every preset we implement, in compressed-tensors' spelling.
pub fn all() -> Vec<Preset> {
    let p = |name, weights, input| Preset {
        name,
        weights,
        input,
    };
    let fp8_token = fp8(Strategy::Token, None);
    let mut v = vec![
        p("W4A16", int(4, true, Strategy::Group, 128), None),
        p("W4A16_ASYM", int(4, false, Strategy::Group, 128), None),
        p("W8A16", int(8, true, Strategy::Group, 128), None),
        p(
            "W8A8",
            int(8, true, Strategy::Channel, 0),
            Some(int(8, true, Strategy::Token, 0)),
        ),
        p(
            "W4AFP8",
            int(4, true, Strategy::Group, 128),
            Some(fp8_token.clone()),
        ),
        p("FP8_DYNAMIC", fp8(Strategy::Channel, None), Some(fp8_token)),
        p(
            "FP8_BLOCK",
            fp8(Strategy::Block, Some([128, 128])),
            Some(float(
                FloatFormat::E4M3,
                Strategy::Group,
                128,
                None,
                false,
                None,
            )),
        ),
        p(
            "NVFP4A16",
            float(
                FloatFormat::E2M1,
                Strategy::TensorGroup,
                16,
                Some(ScaleType::E4M3),
                true,
                None,
            ),
            None,
        ),
        p("MXFP4A16", mx(FloatFormat::E2M1), None),
        p("MXFP4", mx(FloatFormat::E2M1), Some(mx(FloatFormat::E2M1))),
        p("MXFP8A16", mx(FloatFormat::E4M3), None),
        p("MXFP8", mx(FloatFormat::E4M3), Some(mx(FloatFormat::E4M3))),
    ];
    for (name, bits) in [
        ("W2A16", 2),
        ("W3A16", 3),
        ("W5A16", 5),
        ("W6A16", 6),
        ("W7A16", 7),
    ] {
        v.push(p(name, int(bits, true, Strategy::Group, 128), None));
    }
    v
}

/// The preset called `name` (case-insensitive, as compressed-tensors reads it).
pub fn preset(name: &str) -> Option<Preset> {
    all()
        .into_iter()
        .find(|p| p.name.eq_ignore_ascii_case(name))
}

/// The names of every preset, for error messages.
pub fn names() -> Vec<&'static str> {
    all().into_iter().map(|p| p.name).collect()
}

/// The preset whose weights and input activations are `weights` and `input` (the observer
/// aside: a checkpoint does not record how ranges were found), if one is.
pub fn name_of(weights: &QuantArgs, input: Option<&QuantArgs>) -> Option<&'static str> {
    let same = |a: &QuantArgs, b: &QuantArgs| {
        QuantArgs {
            observer: Observer::MinMax,
            ..a.clone()
        } == QuantArgs {
            observer: Observer::MinMax,
            ..b.clone()
        }
    };
    all().into_iter().find_map(|p| {
        let inputs = match (&p.input, input) {
            (None, None) => true,
            (Some(a), Some(b)) => same(a, b),
            _ => false,
        };
        (same(&p.weights, weights) && inputs).then_some(p.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every preset is a grid we quantize onto, names are unique, and each is found again
    /// from its own arguments.
    #[test]
    fn presets_validate_and_name_themselves() {
        let all = all();
        for p in &all {
            p.weights
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(name_of(&p.weights, p.input.as_ref()), Some(p.name));
            assert_eq!(preset(&p.name.to_lowercase()).as_ref(), Some(p));
        }
        let mut names: Vec<_> = all.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
    }
}
