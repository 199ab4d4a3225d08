//! The tensor-level entry points of a [`Quantizer`]: candle tensors on any device, routed
//! to the CPU implementation ([`crate::fake`]) or the GPU kernels ([`crate::device`]).

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use crate::observer::Amax;
use crate::types::{rows_cols, Quantizer, RangeSource, Scheme};

impl Quantizer {
    /// [`Quantizer::fake_quant_weight`] on a candle weight `[out, in]` (any float dtype);
    /// returns the fake-quantized weight as f32 on the same device (on a GPU without leaving
    /// it: [`crate::kernels`]).
    pub fn fake_quant_weight_tensor(&self, w: &Tensor) -> Result<Tensor> {
        let (out_features, in_features) = w.dims2().context("a Linear weight must be 2-D [out, in]")?;
        if !w.device().is_cpu() {
            return crate::device::fake_quant(self, w, RangeSource::FromTensor);
        }
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = self.fake_quant_weight(&data, out_features, in_features)?;
        Ok(Tensor::from_vec(y, (out_features, in_features), w.device())?)
    }

    /// [`Quantizer::fake_quant`] on a candle tensor of any rank (leading dimensions are
    /// rows, the last dimension is `cols`); the result is f32 on the same device (on a GPU
    /// without leaving it: [`crate::kernels`]).
    pub fn fake_quant_tensor(&self, t: &Tensor, amax: Option<&Amax>) -> Result<Tensor> {
        if *self.scheme() == Scheme::Off {
            return Ok(t.to_dtype(DType::F32)?);
        }
        if !t.device().is_cpu() {
            return crate::device::fake_quant(self, t, RangeSource::Calibrated(amax));
        }
        let (rows, cols) = rows_cols(t.dims())?;
        let y = qpipe_compute::f32_data::with_values(t, |x| self.fake_quant(x, rows, cols, amax))??;
        Ok(Tensor::from_vec(y, t.shape(), t.device())?)
    }
}
