//! Fake-quant formats as NVIDIA ModelOpt 0.47 defines and computes them.
//!
//! ## Using it (the `score` stage)
//!
//! ```no_run
//! use qpipe_quant::{config_for, NONE_DISPLAY_NAME};
//! # fn main() -> anyhow::Result<()> {
//! let overrides = serde_json::Map::new(); // pipeline.yaml `quant_granularity.*.quant_cfg_overrides`
//! let cfg = config_for("INT8_DEFAULT_CFG", &overrides)?; // validated; cfg.warnings to print
//! cfg.check_shape(384, 128)?; // per Linear [out=128, in=384]: block sizes must divide `in`
//! let name = cfg.display_name(); // "INT8_DEFAULT_CFG(effective-bits: 8.0)" ("CUSTOM_0(…)" if custom)
//! let cost = cfg.cost(384 * 128); // weight elements × effective bits / 16
//! # let _ = (name, cost, NONE_DISPLAY_NAME);
//!
//! // Weights [out, in]: static ranges come from the weight itself.
//! let wq = cfg.weight_quantizer();
//! # let w = vec![0.0f32; 128 * 384];
//! let w_q = wq.fake_quant_weight(&w, 128, 384)?;
//!
//! // Inputs [tokens, in]: max calibration over all calibration batches, then quantize.
//! let iq = cfg.input_quantizer();
//! let mut obs = iq.observer(); // None when the input is off or fully dynamic
//! # let (x, tokens) = (vec![0.0f32; 4 * 384], 4);
//! if let Some(o) = obs.as_mut() { o.observe(&x, tokens, 384)?; } // every calibration batch
//! let amax = obs.and_then(|o| o.amax());
//! let x_q = iq.fake_quant(&x, tokens, 384, amax.as_ref())?; // or fake_quant_tensor(&Tensor, …)
//! # let _ = (w_q, x_q);
//! # Ok(()) }
//! ```
//!
//! The "not quantized" candidate is [`NONE_DISPLAY_NAME`] (`NONE(effective-bits: 16.0)`).
//!
//! ## Formats
//!
//! Built-ins ([`known_formats`]) mirror ModelOpt's presets: `INT8_DEFAULT_CFG`,
//! `INT8_WEIGHT_ONLY_CFG`, `FP8_DEFAULT_CFG`, `FP8_PER_CHANNEL_PER_TOKEN_CFG`,
//! `INT4_BLOCKWISE_WEIGHT_ONLY_CFG`, `NVFP4_DEFAULT_CFG`, `W4A16_NVFP4_CFG`,
//! `W4A8_NVFP4_FP8_CFG`, `MXFP4_DEFAULT_CFG`, `W4A8_MXFP4_FP8_CFG`, `MXFP8_DEFAULT_CFG`.
//! The seed's custom pair formats (`FP8_WEIGHT_ONLY_CFG`, `INT8_WEIGHT_FP8_ACT_CFG`, …) are
//! composed from the same pieces and print as `CUSTOM_<i>`. Effective bits follow
//! ModelOpt's `estimate_quant_compression`: the minimum over the enabled quantizers, so
//! FP8 weights with INT4 activations count 4 bits and `W4A8_NVFP4_FP8_CFG` 4.0 (no
//! `effective_bits` in its weight entry), NVFP4 4.5.
//!
//! Numerics ([`fake`], [`numerics`]): INT with ModelOpt's default `narrow_range = False`
//! (INT8 clamps to [-128, 127] with scale amax/127), round half to even; FP8 E4M3 RNE
//! saturating at 448; NVFP4 as ModelOpt's Triton kernel (the one H100/H200 run), except
//! that qpipe honours a configured block size where ModelOpt's Hopper kernel always uses
//! 16; MX with ModelOpt's CUDA E8M0 rule (`ceil(log2(amax / elem_max))`).
//!
//! ## How closely it matches ModelOpt
//!
//! - INT and FP8 (every granularity): bit for bit with ModelOpt 0.47's `TensorQuantizer` on
//!   the CPU, signed zeros and calibrated amax included (`stages/quant/tests/fixtures/
//!   quant_modelopt.json`, made by `scripts/modelopt_quant_vectors.py`). One PyTorch detail
//!   matters: `448.0 / amax` is evaluated as `reciprocal(amax) * 448`.
//! - FP4 (NVFP4, MXFP4) and MXFP8: ModelOpt needs CUDA for these, so they are tested
//!   against hand-computed blocks and an independent reference in `quant/tests.rs` (bit
//!   for bit). On a GPU, ModelOpt's Triton kernel divides with approximate fp32 division
//!   and its MX extension is built with `--use_fast_math`, so a quotient within ~2 ulp of
//!   an E2M1/E4M3 rounding boundary (or an MX scale within 2 ulp of a power of two) may
//!   round one step differently there; subnormal block maxima are flushed to zero there.
//! - Static ranges do not scan the tensor being quantized for NaN (calibration does and
//!   errors); dynamic ranges error on NaN/inf. MX maps ±0 to +0.
//!
//! ## The pipeline.yaml grid
//!
//! All 16 pairs × 9 granularities build on the embedded model except the 16 cells that ask
//! FP4 weights for an `axis` (`w_per_tensor`, `w_per_out_channel`, `w_per_in_channel`,
//! `recipe_match_channel_token` × the four `wfp4_*` pairs): E2M1 only exists with block
//! scales, ModelOpt rejects `axis` with `block_sizes` and has no non-block E2M1 kernel.
//! Overlays on a disabled input quantizer (fp16 activations) change nothing and warn.
//! See [`config_for`] for the overlay rules and [`check_combination`] for load-time checks.

// Layers, each using only those above it: `numerics`, `observer` → `types` →
// `spec` (format tables), `fake` (CPU), `kernels` (GPU launch plans) → `cuda` → `device`
// → `tensor` (the tensor-level entry points) ; `int_product` uses `types` only.
pub mod numerics;
pub mod observer;
pub mod types;

pub mod fake;
pub mod kernels;
pub mod spec;

#[cfg(feature = "cuda")]
mod cuda;
mod device;
pub mod int_product;
mod tensor;

#[cfg(test)]
mod kernel_tests;
#[cfg(test)]
mod tests;

pub use device::ranges as device_ranges;
pub use observer::{Amax, AmaxKind, AmaxObserver};
pub use spec::{
    check_combination, config_for, known_formats, BlockSizes, QuantConfig, QuantizerSpec, NONE_DISPLAY_NAME,
};
pub use types::{IntCodes, NumBits, Quantizer, RangeSource, Role, Scheme};
