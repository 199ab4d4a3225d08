//! Numeric plumbing shared by the model (`qpipe-model`) and the quantizers (`qpipe-quant`),
//! which know nothing of each other:
//!
//! | module       | what it holds |
//! |--------------|---------------|
//! | [`device`]   | `autoquant.device` / `autoquant.dtype` resolution, candle devices, free memory |
//! | [`f32_data`] | a tensor's values as `&[f32]`, in place when they already are one |
//! | [`grad_score`] | ModelOpt's gradient score term `Σ clamp(g·d, ±1e10)²` and its sums |
//! | [`simd`]     | the vector level ([`simd::level`], `QPIPE_SIMD`) and [`simd_dispatch!`]: element-wise kernels compiled per level |
//! | [`par`]      | [`par::SendPtr`]: one output buffer filled by several threads |
//! | [`malloc`]   | the C allocator's settings for scoring on the CPU |

pub mod device;
pub mod f32_data;
pub mod grad_score;
pub mod malloc;
pub mod par;
pub mod simd;
