//! The calibration-token file `build-calib` writes and `score` reads: a torch-loadable
//! `.pt` of int64 tensors `input_ids` [N,T], `attention_mask` [N,T], `labels` [N,T] and
//! `pad_token_id` [1].

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};

use crate::io::torch_pt;

/// A calibration set: `n` samples of `t` tokens, row-major (`[i * t + j]` is token `j`
/// of sample `i`), left-padded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibSet {
    pub n: usize,
    pub t: usize,
    /// Token ids, `n * t`.
    pub input_ids: Vec<u32>,
    /// 1 for a token, 0 for padding, `n * t`.
    pub attention_mask: Vec<u32>,
    /// The loss targets as written (= input_ids), `n * t`.
    pub labels: Vec<i64>,
    pub pad_token_id: u32,
}

impl CalibSet {
    /// Samples `rows` (a batch), as a new set.
    pub fn slice(&self, rows: Range<usize>) -> CalibSet {
        let r = rows.start * self.t..rows.end * self.t;
        CalibSet {
            n: rows.len(),
            t: self.t,
            input_ids: self.input_ids[r.clone()].to_vec(),
            attention_mask: self.attention_mask[r.clone()].to_vec(),
            labels: self.labels[r].to_vec(),
            pad_token_id: self.pad_token_id,
        }
    }

    /// `input_ids` as a `[n, t]` u32 tensor.
    pub fn input_ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.input_ids, (self.n, self.t), device)?)
    }

    /// `attention_mask` as a `[n, t]` u32 tensor.
    pub fn attention_mask_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.attention_mask, (self.n, self.t), device)?)
    }

    /// `labels` as a `[n, t]` i64 tensor.
    pub fn labels_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.labels, (self.n, self.t), device)?)
    }

    /// The `.pt` tree (int64 tensors).
    pub fn to_pt(&self) -> Result<torch_pt::Value> {
        let shape = [self.n, self.t];
        let i64s = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
        Ok(torch_pt::Value::dict([
            ("input_ids", torch_pt::Tensor::from_i64(&shape, &i64s(&self.input_ids))?.into()),
            ("attention_mask", torch_pt::Tensor::from_i64(&shape, &i64s(&self.attention_mask))?.into()),
            ("labels", torch_pt::Tensor::from_i64(&shape, &self.labels)?.into()),
            ("pad_token_id", torch_pt::Tensor::from_i64(&[1], &[i64::from(self.pad_token_id)])?.into()),
        ]))
    }
}

/// Reads a calibration `.pt` written by build-calib (or by torch with the same keys).
pub fn load_calib(path: &Path) -> Result<CalibSet> {
    let ctx = || format!("cannot read calibration set {}", path.display());
    let pth = candle_core::pickle::PthTensors::new(path, None).with_context(ctx)?;
    let get = |key: &str| -> Result<Tensor> {
        pth.get(key)
            .with_context(ctx)?
            .with_context(|| format!("calibration set {} has no `{key}` tensor; rebuild it", path.display()))
    };
    let to_i64 = |key: &str, t: &Tensor| -> Result<Vec<i64>> {
        ensure!(
            t.dtype() == candle_core::DType::I64,
            "calibration set {}: `{key}` is {:?}, expected int64",
            path.display(),
            t.dtype()
        );
        Ok(t.flatten_all()?.to_vec1::<i64>()?)
    };
    let ids = get("input_ids")?;
    let (n, t) =
        ids.dims2().with_context(|| format!("calibration set {}: `input_ids` is not [N, T]", path.display()))?;
    let to_u32 = |key: &str, v: Vec<i64>| -> Result<Vec<u32>> {
        v.into_iter()
            .map(|x| {
                u32::try_from(x).map_err(|_| anyhow::anyhow!("calibration set {}: `{key}` holds {x}", path.display()))
            })
            .collect()
    };
    let input_ids = to_u32("input_ids", to_i64("input_ids", &ids)?)?;
    let shaped = |key: &str| -> Result<Vec<i64>> {
        let x = get(key)?;
        ensure!(
            x.dims() == [n, t],
            "calibration set {}: `{key}` is {:?}, expected [{n}, {t}]",
            path.display(),
            x.dims()
        );
        to_i64(key, &x)
    };
    let attention_mask = to_u32("attention_mask", shaped("attention_mask")?)?;
    let labels = shaped("labels")?;
    let pad = to_i64("pad_token_id", &get("pad_token_id")?)?;
    let [pad] = pad[..] else { bail!("calibration set {}: `pad_token_id` is not one number", path.display()) };
    let pad_token_id = to_u32("pad_token_id", vec![pad])?[0];
    Ok(CalibSet { n, t, input_ids, attention_mask, labels, pad_token_id })
}
