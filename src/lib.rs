//! `compress`: offline LLM compression.
//!
//! Data flows one way:
//! checkpoint ([`model`]) → calibration tokens ([`calib`]) → layer stream ([`engine`]) running
//! [`passes`] → [`export`] writers → evaluation ([`eval`]) → report ([`report`]).
//! Passes never touch file formats; exporters never run algorithms; the engine alone knows the
//! order of work.

// Numeric kernels index several arrays in lockstep and take many parameters, as the papers do.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

pub mod backend;
pub mod calib;
pub mod config;
pub mod engine;
pub mod eval;
pub mod export;
pub mod formats;
pub mod inspect;
pub mod linalg;
pub mod lock;
pub mod model;
pub mod number;
pub mod passes;
pub mod pipeline;
pub mod progress;
pub mod quant;
pub mod report;
pub mod resume;
pub mod runner;
pub mod safetensors_file;
#[cfg(test)]
pub mod testing;
pub mod util;
pub mod verify;
