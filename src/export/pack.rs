//! The packers and readers now live with their formats in `crate::formats`; re-exported here
//! for code written against the earlier layout.

pub use crate::formats::bits::*;
pub use crate::formats::compressed_tensors::*;
pub use crate::formats::gptq::*;
pub use crate::formats::{NamedTensor, TensorGetter};
