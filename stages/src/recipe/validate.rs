//! Checking a recipe's prediction: every chosen Linear fake-quantized at once (inputs
//! calibrated as the scorer calibrates them, on the calibration batches), measured on
//! held-out captions against the unquantized model — the mean cross-entropy increase and
//! the mean KL divergence per predicted token.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use qpipe_contract::Progress;

use crate::score::backend::{Batch, LinearOverride, ScoreFormat, ScoreModel};
use crate::score::scorer::{calibrate_inputs, LogProbs};

/// Rows of logits formed at once (bounds the `[rows, vocab]` buffers).
const HEAD_ROWS: usize = 256;

/// What one recipe did on the held-out set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Mean cross-entropy (per predicted token) with the recipe applied, minus without.
    pub loss_increase: f64,
    /// Mean KL(unquantized ‖ quantized) of the next-token distribution per predicted token.
    pub kl: f64,
}

/// One recipe: per group, `Some(format index)` or `None` (not quantized).
pub type Choice = Vec<Option<usize>>;

/// The unquantized held-out loss and, per recipe in `choices`, what it measures.
/// `members[g]` are group g's Linears.
pub fn measure(
    model: &dyn ScoreModel,
    formats: &[&dyn ScoreFormat],
    members: &[Vec<String>],
    choices: &[Choice],
    calib: &[Batch],
    holdout: &[Batch],
    progress: &dyn Progress,
) -> Result<(f64, Vec<Measured>)> {
    let needing: Vec<&dyn ScoreFormat> = formats.iter().copied().filter(|f| f.input_needs_calibration()).collect();
    if !needing.is_empty() {
        calibrate_inputs(model, &needing, calib, progress).context("calibrating the formats' input ranges")?;
    }
    type InputFn<'f> = Box<dyn Fn(&Tensor) -> Result<Tensor> + Sync + 'f>;
    // One input quantizer per (format, linear), made once.
    let mut input_fns: HashMap<(usize, String), InputFn<'_>> = HashMap::new();
    for (fi, &f) in formats.iter().enumerate() {
        if !f.quantizes_input() {
            continue;
        }
        for m in members.iter().flatten() {
            let name = m.clone();
            input_fns
                .insert((fi, m.clone()), Box::new(move |x: &Tensor| Ok(f.quant_input(&name, x)?.to_dtype(x.dtype())?)));
        }
    }
    let vocab = model.vocab_size();
    let (mut ref_ce, mut count) = (0.0f64, 0usize);
    let mut sums = vec![(0.0f64, 0.0f64); choices.len()];
    progress.phase("validate on held-out captions", Some((holdout.len() * choices.len()) as u64));
    for (bi, b) in holdout.iter().enumerate() {
        let (bs, t) = (b.input_ids.len(), b.input_ids.first().map_or(0, Vec::len));
        let (targets, weights, n_targets) =
            qpipe_model::loss::shifted_targets(&b.input_ids, (bs, t), vocab, Some(b.pad_token_id))?;
        count += n_targets;
        let (hidden, kept) = model.forward_resumable(b).with_context(|| format!("held-out forward, batch {bi}"))?;
        let n = bs * t;
        let chunks: Vec<std::ops::Range<usize>> =
            (0..n).step_by(HEAD_ROWS).map(|r| r..(r + HEAD_ROWS).min(n)).collect();
        for c in &chunks {
            ref_ce += ce_sum(&model.head_logits(&hidden, c.clone())?, &targets[c.clone()], &weights[c.clone()])?;
        }
        for (pi, choice) in choices.iter().enumerate() {
            let mut ov: HashMap<String, LinearOverride<'_>> = HashMap::new();
            for (g, f) in choice.iter().enumerate() {
                let Some(fi) = *f else { continue };
                for m in &members[g] {
                    let w = model.weight(m)?;
                    let wq = formats[fi].quant_weight(m, &w)?.to_dtype(w.dtype())?;
                    ov.insert(
                        m.clone(),
                        LinearOverride { weight: wq, input: input_fns.get(&(fi, m.clone())).map(|f| f.as_ref()) },
                    );
                }
            }
            let hq = if ov.is_empty() {
                hidden.clone()
            } else {
                model
                    .hidden_resumed(b, &kept, &ov)
                    .with_context(|| format!("held-out forward with recipe {pi}, batch {bi}"))?
            };
            for c in &chunks {
                let (ws, ts) = (&weights[c.clone()], &targets[c.clone()]);
                let lq = model.head_logits(&hq, c.clone())?;
                sums[pi].0 += ce_sum(&lq, ts, ws)?;
                let reference = LogProbs::new(&model.head_logits(&hidden, c.clone())?)?;
                let kl = reference.kl_rows(&lq)?;
                sums[pi].1 += kl.iter().zip(ws).filter(|(_, w)| **w > 0.0).map(|(k, _)| k).sum::<f64>();
            }
            progress.advance(1);
        }
    }
    if count == 0 {
        bail!("the held-out captions predict no token (every label is padding)");
    }
    let n = count as f64;
    let base = ref_ce / n;
    Ok((base, sums.iter().map(|&(ce, kl)| Measured { loss_increase: ce / n - base, kl: kl / n }).collect()))
}

/// Σ over rows with a nonzero weight of `−log softmax(row)[target]`, in f64.
fn ce_sum(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<f64> {
    let (rows, v) = logits.dims2()?;
    let x = logits.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut s = 0.0;
    for r in 0..rows {
        if weights[r] <= 0.0 {
            continue;
        }
        let row = &x[r * v..(r + 1) * v];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|&a| (a - m).exp()).sum::<f64>().ln();
        s += lse - row[targets[r] as usize];
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_of_rows() {
        let l = Tensor::new(&[[0.0f32, 0.0], [1.0, 3.0]], &candle_core::Device::Cpu).unwrap();
        let s = ce_sum(&l, &[0, 1], &[1.0, 1.0]).unwrap();
        let want = 2f64.ln() + ((1f64.exp() + 3f64.exp()).ln() - 3.0);
        assert!((s - want).abs() < 1e-12, "{s} vs {want}");
        assert_eq!(ce_sum(&l, &[0, 1], &[0.0, 0.0]).unwrap(), 0.0);
    }
}
