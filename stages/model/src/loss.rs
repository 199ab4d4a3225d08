//! Losses on logits: shifted cross-entropy (as a causal-LM head computes it with
//! `labels = input_ids`) and log-softmax for KL divergences.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

/// Cross-entropy and its gradient w.r.t. the logits.
pub struct CrossEntropy {
    /// Mean over non-ignored positions (torch's `reduction="mean"`); NaN when every
    /// target is ignored, as in torch.
    pub loss: f32,
    /// dL/dlogits `[B, T, V]` (zero at ignored and last positions).
    pub dlogits: Tensor,
    /// Number of targets that count.
    pub count: usize,
}

/// Log-softmax over the vocabulary (last dim).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}

/// `torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0,1), labels[:, 1:].flatten(),
/// ignore_index=ignore_index)` and its gradient. `labels` is `[B][T]` (usually the input
/// ids); `None` ignores nothing.
pub fn shifted_cross_entropy(logits: &Tensor, labels: &[Vec<u32>], ignore_index: Option<u32>) -> Result<CrossEntropy> {
    let (b, t, v) = logits.dims3()?;
    let (targets, weights, count) = shifted_targets(labels, (b, t), v, ignore_index)?;
    let (loss, dlogits) = cross_entropy_rows(&logits.reshape((b * t, v))?, &targets, &weights)?;
    let loss = if count == 0 { f32::NAN } else { loss as f32 };
    Ok(CrossEntropy { loss, dlogits: dlogits.reshape((b, t, v))?, count })
}

/// Per position of a `[b, t]` batch (row-major), the next token it predicts and its
/// weight in the mean loss (`1/count`, or 0 where the label is ignored and at each row's
/// last position), and `count`, the number of targets that count.
pub fn shifted_targets(
    labels: &[Vec<u32>],
    (b, t): (usize, usize),
    vocab: usize,
    ignore_index: Option<u32>,
) -> Result<(Vec<u32>, Vec<f32>, usize)> {
    ensure!(labels.len() == b, "labels have {} rows, logits {b}", labels.len());
    let n = b * t;
    let mut targets = vec![0u32; n];
    let mut valid = vec![0f32; n];
    let mut count = 0usize;
    for (bi, row) in labels.iter().enumerate() {
        ensure!(row.len() == t, "labels row {bi} has length {} != {t}", row.len());
        for ti in 0..t.saturating_sub(1) {
            let y = row[ti + 1];
            if Some(y) == ignore_index {
                continue;
            }
            ensure!(
                (y as usize) < vocab,
                "label {y} at row {bi} position {} is outside the vocabulary ({vocab})",
                ti + 1
            );
            targets[bi * t + ti] = y;
            valid[bi * t + ti] = 1.0;
            count += 1;
        }
    }
    let weights = valid.iter().map(|x| x / count.max(1) as f32).collect();
    Ok((targets, weights, count))
}

/// `Σ_rows weight · (−log softmax(logits)[target])` over rows of `logits: [r, V]`, and its
/// gradient w.r.t. the logits (zero in rows of weight 0). Half-precision logits are
/// upcast to f32, as transformers' loss does, and the gradient comes back in their dtype.
/// Each row's gradient depends on that row alone, so the rows may be taken in chunks.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<(f64, Tensor)> {
    if crate::ops::is_half(logits.dtype()) {
        let (loss, d) = cross_entropy_rows(&logits.to_dtype(DType::F32)?, targets, weights)?;
        return Ok((loss, d.to_dtype(logits.dtype())?));
    }
    let (n, _) = logits.dims2()?;
    ensure!(targets.len() == n && weights.len() == n, "{} targets for {n} rows of logits", targets.len());
    if let Some(r) = crate::fused::cross_entropy_rows(logits, targets, weights) {
        return Ok(r);
    }
    let dev = logits.device();
    let lsm = log_softmax(logits)?;
    let targets = Tensor::from_vec(targets.to_vec(), (n, 1), dev)?;
    let w = if logits.dtype() == DType::F64 {
        // Each weight is 0 or `1/count` rounded to f32; an f64 model's mean is exactly
        // `1/count` (`count` is `1/w` rounded: exact below 2^24 targets).
        let w64: Vec<f64> =
            weights.iter().map(|&w| if w > 0.0 { 1.0 / (1.0 / f64::from(w)).round() } else { 0.0 }).collect();
        Tensor::from_vec(w64, (n, 1), dev)?
    } else {
        Tensor::from_vec(weights.to_vec(), (n, 1), dev)?.to_dtype(logits.dtype())?
    };
    let picked = lsm.gather(&targets, 1)?;
    let loss = -(picked * &w)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let probs = lsm.exp()?.broadcast_mul(&w)?;
    let dlogits = probs.scatter_add(&targets, &w.neg()?, 1)?;
    Ok((loss, dlogits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn cross_entropy_matches_hand_computation_and_autograd() {
        let dev = Device::Cpu;
        let logits = Var::randn(0f32, 2.0, (2, 4, 6), &dev).unwrap();
        let labels = vec![vec![0, 0, 3, 5], vec![1, 2, 0, 4]];
        let ce = shifted_cross_entropy(logits.as_tensor(), &labels, Some(0)).unwrap();
        // targets: row0 t=1→3, t=2→5 ; row1 t=0→2, t=2→4 (t=1 → 0 ignored)
        let l = logits.as_tensor().to_vec3::<f32>().unwrap();
        let nll = |row: &Vec<f32>, y: usize| {
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            let lse = row.iter().map(|x| (x - m).exp()).sum::<f32>().ln() + m;
            lse - row[y]
        };
        let want = (nll(&l[0][1], 3) + nll(&l[0][2], 5) + nll(&l[1][0], 2) + nll(&l[1][2], 4)) / 4.0;
        assert_eq!(ce.count, 4);
        assert!((ce.loss - want).abs() < 1e-5, "{} vs {want}", ce.loss);

        // gradient against autograd of the same loss built from basic ops
        let lsm = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let pick = |bi: usize, ti: usize, y: usize| lsm.get(bi).unwrap().get(ti).unwrap().get(y).unwrap();
        let total = (((pick(0, 1, 3) + pick(0, 2, 5)).unwrap() + pick(1, 0, 2)).unwrap() + pick(1, 2, 4)).unwrap();
        let loss = (total.neg().unwrap() / 4.0).unwrap();
        let g = loss.backward().unwrap();
        let want_g = g.get(&logits).unwrap();
        let diff = (&ce.dlogits - want_g).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");

        // the fused kernel (untracked logits) agrees with the composed ops (tracked)
        let fused = shifted_cross_entropy(&logits.as_tensor().detach(), &labels, Some(0)).unwrap();
        assert!((fused.loss - ce.loss).abs() < 1e-6, "{} vs {}", fused.loss, ce.loss);
        let diff =
            (&fused.dlogits - &ce.dlogits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn all_ignored_is_nan_like_torch() {
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let ce = shifted_cross_entropy(&logits, &[vec![0, 0, 0]], Some(0)).unwrap();
        assert!(ce.loss.is_nan());
        assert_eq!(ce.count, 0);
    }
}
