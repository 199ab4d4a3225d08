//! Fake quantization and range observation of tensors that live off the CPU: the GPU
//! kernels ([`crate::kernels`], run by `quant::cuda`) when this build has CUDA, a clear
//! error otherwise.

use anyhow::Result;
use candle_core::Tensor;

use crate::observer::AmaxKind;
use crate::types::Quantizer;
use crate::types::RangeSource;

/// `q` applied to `t` (`[.., cols]`) on its device; f32 on the same device.
pub fn fake_quant(q: &Quantizer, t: &Tensor, ranges: RangeSource<'_>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        return crate::cuda::fake_quant(q, t, ranges);
    }
    let _ = (q, ranges);
    anyhow::bail!(
        "fake quantization on {:?} is not built into this qpipe (build it with `--features cuda`)",
        t.device()
    )
}

/// The `kind` ranges (max |x| per group, [`AmaxKind::reduce`]) of `t` (`[.., cols]`)
/// computed on its device, and whether it had NaN/Inf.
pub fn ranges(kind: AmaxKind, t: &Tensor) -> Result<(Vec<f32>, bool)> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        return crate::cuda::ranges(kind, t);
    }
    let _ = kind;
    anyhow::bail!(
        "range calibration on {:?} is not built into this qpipe (build it with `--features cuda`)",
        t.device()
    )
}
