//! Calibration and the two scorers, on top of [`ScoreModel`] and [`ScoreFormat`].
//!
//! Calibration ("max"): for formats with static input ranges, input amax of every linear
//! = max |x| over all calibration batches of the *unquantized* model (ModelOpt calibrates
//! with every quantizer in calibration mode, which does not quantize), pad positions
//! included. Weight ranges come from the weights themselves (inside the format).
//!
//! `gradient`: per score batch one forward + backward of the unquantized model; per linear
//! and recipe `Σ clamp(dL/dY ⊙ (Y_q − Y), ±1e10)²` where `Y_q` uses the fake-quantized
//! weight (and input, if the format quantizes inputs) — `_get_auto_quantize_score` in
//! ModelOpt. A recipe's score is the sum over its members and score batches.
//!
//! `kl_div`: per score batch the unquantized log-probabilities, then one recipe at a time
//! quantized in the whole model: `Σ p_fp · (log p_fp − log p_q)` over every position
//! (pads included) and the vocabulary (`F.kl_div(..., reduction="sum", log_target=True)`).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::backend::{Batch, KeptForward, LinearOverride, ScoreFormat, ScoreModel};
use super::memory;
use super::recipes::Recipe;
use qpipe_compute::{f32_data, grad_score};
use qpipe_contract::Progress;
use qpipe_quant::int_product;

/// Error unless every element of `t` is finite, naming what it is.
pub fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    // On the tensor's device: `t − t` is NaN exactly where `t` is not finite.
    if qpipe_model::weights::check_finite(t).is_err() {
        bail!("{what} contains NaN or Inf; check the checkpoint's weights and the calibration tokens");
    }
    Ok(())
}

/// Folds one calibration batch's input of `name` into the format's range; errors name
/// the linear on NaN/Inf (the format's range reduction finds them in the same pass).
fn observe(format: &dyn ScoreFormat, name: &str, x: &Tensor, batch: usize) -> Result<()> {
    format
        .observe_input(name, x)
        .with_context(|| format!("calibrating the input range of linear `{name}` (calibration batch {batch})"))
}

/// Max calibration: every calibration batch through the unquantized model once, each
/// linear's input folded into the range observer of each format. Errors name the linear on NaN/Inf.
pub fn calibrate_inputs(
    model: &dyn ScoreModel,
    formats: &[&dyn ScoreFormat],
    batches: &[Batch],
    progress: &dyn Progress,
) -> Result<()> {
    progress.phase("calibrate", Some(batches.len() as u64));
    for (bi, b) in batches.iter().enumerate() {
        model
            .forward_inputs(b, &mut |name, x| formats.iter().try_for_each(|f| observe(*f, name, x, bi)))
            .with_context(|| format!("calibration forward, batch {bi}"))?;
        progress.advance(1);
    }
    Ok(())
}

/// Indices of the rows of `g` (`[rows, cols]`) that are not all zero; `None` when more than
/// three quarters of the rows are.
fn nonzero_rows(g: &Tensor) -> Result<Option<Vec<u32>>> {
    let (rows, cols) = g.dims2()?;
    // One pass that stops at a row's first nonzero value (most rows: its first).
    let nonzero: Vec<bool> = match f32_data::borrow(g, |v| {
        v.par_chunks(cols.max(1)).map(|r| r.iter().any(|x| *x != 0.0)).collect::<Vec<bool>>()
    }) {
        Some(m) => m,
        None => g
            .abs()?
            .max_keepdim(1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|m| m != 0.0)
            .collect(),
    };
    let keep: Vec<u32> = nonzero.iter().enumerate().filter(|(_, nz)| **nz).map(|(i, _)| i as u32).collect();
    // Selecting rows copies them: worth it only when it drops a good share of the work.
    if keep.len() * 4 > rows * 3 {
        return Ok(None);
    }
    Ok(Some(keep))
}

/// Every member linear of `recipes`, by name, with `prepare(name, W)` of its weight `W`
/// (in the model's dtype); a non-finite weight is an error naming its linear, and errors of
/// `prepare` name it too.
fn prepare_weights<T>(
    model: &dyn ScoreModel,
    recipes: &[Recipe],
    mut prepare: impl FnMut(&str, Tensor) -> Result<T>,
) -> Result<HashMap<String, T>> {
    let mut out = HashMap::new();
    for m in recipes.iter().flat_map(|r| &r.members) {
        let w = model.weight(m)?;
        check_finite(&w, &format!("the weight of linear `{m}`"))?;
        out.insert(m.clone(), prepare(m, w).with_context(|| format!("fake-quantizing the weight of `{m}`"))?);
    }
    Ok(out)
}

/// Per-linear prepared tensors for the gradient scorer.
struct Prepared {
    /// The fake-quantized weight `Wq` `[out, in]` in the model's dtype, contiguous; `None`
    /// when `int_w` stands in for it.
    wq: Option<Tensor>,
    /// Half-precision models: `Wq − W` (see [`half_precision_diff`]).
    dw: Option<Tensor>,
    /// `Wq`'s integer codes packed for [`int_product`], when weights and inputs are both on
    /// 8-bit integer grids (f32 models on a CPU with AVX-512 VNNI).
    int_w: Option<int_product::PackedWeight>,
}

/// `Σ clamp(dy·(y_q − y), ±1e10)²` (`_get_auto_quantize_score`), accumulated in f64:
/// `dy` = dL/dY, `y_q` the output with the recipe applied, `y` the unquantized output; all
/// `[N, out]`. Half-precision tensors are widened to f32 first, as ModelOpt's score is; an
/// f64 model's stay f64.
pub fn gradient_score(dy: &Tensor, y_q: &Tensor, y: &Tensor) -> Result<f64> {
    ensure!(
        dy.dims() == y_q.dims() && dy.dims() == y.dims(),
        "gradient score: shapes {:?} {:?} {:?} differ",
        dy.dims(),
        y_q.dims(),
        y.dims()
    );
    let (dy, y_q, y) = (widened(dy)?, widened(y_q)?, widened(y)?);
    if let Some(s) = f32_data::borrow3(&dy, &y_q, &y, grad_score::sum_diff) {
        return Ok(s);
    }
    let x = (&dy * (&y_q - &y)?)?.clamp(-1e10, 1e10)?.sqr()?;
    Ok(x.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// `Σ clamp(g·d, ±1e10)²` for an output difference `d = Y_q − Y` formed elsewhere
/// ([`half_precision_diff`]); the same terms as [`gradient_score`].
pub fn grad_score(g: &Tensor, d: &Tensor) -> Result<f64> {
    if g.dims() != d.dims() {
        bail!("gradient {:?} and output difference {:?} differ in shape", g.dims(), d.dims());
    }
    let (g, d) = (widened(g)?, widened(d)?);
    if let Some(s) = f32_data::borrow2(&g, &d, grad_score::sum_product) {
        return Ok(s);
    }
    let x = (g * d)?.clamp(-1e10, 1e10)?.sqr()?;
    Ok(x.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// `t` contiguous in f32 (half precision widened) or, in an f64 model, f64.
fn widened(t: &Tensor) -> Result<Tensor> {
    let to = if t.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    Ok(t.to_dtype(to)?.contiguous()?)
}

/// `Y_q − Y` of one linear in a half-precision (bf16/f16) model, from the quantization
/// errors: `(X_q − X)·W_qᵀ + X·(W_q − W)ᵀ`. Each product rounds to half precision relative
/// to its own small magnitude, where `X_q·W_qᵀ − X·Wᵀ` would subtract two outputs rounded
/// relative to `|Y|` (2⁻⁹ of `|Y|` is as large as the difference of a good 8-bit format).
/// `dx` = `X_q − X` (`None` when inputs are not quantized), `dw` = `W_q − W`.
fn half_precision_diff(x: &Tensor, dx: Option<&Tensor>, wq: &Tensor, dw: &Tensor) -> Result<Tensor> {
    let d = qpipe_model::matmul_xwt(x, dw)?;
    Ok(match dx {
        Some(dx) => (d + qpipe_model::matmul_xwt(dx, wq)?)?,
        None => d,
    })
}

/// The quantized form of the input last seen: q/k/v (and gate/up) read the same tensor with
/// the same calibrated range, so it is quantized once for them.
struct LastInput<T> {
    last: Option<((candle_core::TensorId, Option<u32>), T)>,
}

impl<T> Default for LastInput<T> {
    fn default() -> Self {
        Self { last: None }
    }
}

impl<T: Clone> LastInput<T> {
    /// The value for input `x` with range `amax`: the last one when both are the same, else
    /// `make()`, kept for next time.
    fn get(&mut self, x: &Tensor, amax: Option<f32>, make: impl FnOnce() -> Result<T>) -> Result<T> {
        let key = (x.id(), amax.map(f32::to_bits));
        match &self.last {
            Some((k, v)) if *k == key => Ok(v.clone()),
            _ => {
                let v = make()?;
                self.last = Some((key, v.clone()));
                Ok(v)
            }
        }
    }
}

/// `a − b` computed in f32, returned in `dtype`.
fn diff_in(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.to_dtype(dtype)?)
}

/// One forward/backward of the `gradient` scorer: a batch, or a slice of its rows when a
/// whole batch does not fit the memory plan.
struct Piece {
    batch: usize,
    rows: Batch,
    /// `targets(slice) / targets(batch)`: makes the slice's mean-loss gradient the batch's.
    loss_scale: f64,
}

impl Piece {
    fn split(batch: usize, b: &Batch, rows: usize) -> Vec<Piece> {
        if rows >= b.input_ids.len() {
            return vec![Piece { batch, rows: b.clone(), loss_scale: 1.0 }];
        }
        let total = target_count(b).max(1) as f64;
        (0..b.input_ids.len())
            .step_by(rows.max(1))
            .map(|s| {
                let r = b.rows(s..(s + rows).min(b.input_ids.len()));
                Piece { batch, loss_scale: target_count(&r) as f64 / total, rows: r }
            })
            .collect()
    }
}

/// Positions of `b` the shifted cross-entropy counts: those whose next token is not the pad
/// id (`ignore_index`).
fn target_count(b: &Batch) -> usize {
    b.input_ids.iter().map(|row| row.iter().skip(1).filter(|&&y| !b.ignores(y)).count()).sum()
}

/// What decides how the `gradient` scorer walks the batches for a format — whether the
/// input quantizer treats token rows independently (inputs unquantized, or a static
/// range), so that a batch may be scored in slices of its rows and rows with zero gradient
/// skipped: formats that agree on it can share one pass ([`gradient_scores`]) and get
/// the scores each gets alone, bit for bit.
pub fn pass_class(format: &dyn ScoreFormat) -> bool {
    !format.quantizes_input() || format.input_needs_calibration()
}

/// The scorer's own per-layer bytes for `rows` rows: per format, the widest layer's
/// prepared weights (f32) and a quantized input, output and gradient rows per Linear.
fn scorer_layer_bytes(model: &dyn ScoreModel, formats: usize, needs: &memory::Needs) -> u64 {
    let linears = model.linears();
    let per_layer = linears
        .chunks(qpipe_model::LINEARS_PER_LAYER)
        .map(|l| l.iter().map(|x| x.weight_numel as u64).sum::<u64>())
        .max()
        .unwrap_or(0);
    formats as u64 * (4 * per_layer + 2 * needs.linear_io)
}

/// The memory plan of [`gradient_scores`] for `formats` on `batches` within `limit`.
pub fn gradient_plan(
    model: &dyn ScoreModel,
    formats: &[&dyn ScoreFormat],
    batches: &[Batch],
    limit: Option<u64>,
) -> Result<memory::Plan> {
    let batch_rows = batches.first().map_or(1, |b| b.input_ids.len());
    let t = batches.first().and_then(|b| b.input_ids.first()).map_or(1, Vec::len);
    let first = batches.first();
    let shape = |rows: usize| Batch {
        input_ids: vec![vec![0; t]; rows],
        attention_mask: vec![vec![1; t]; rows],
        pad_token_id: 0,
        ignored_token_ids: Vec::new(),
        // The first batch's images stand for every batch's (the tower's share of the plan).
        images: match first {
            Some(b) if !b.images.is_empty() => b.images.iter().cycle().take(rows).cloned().collect(),
            _ => Vec::new(),
        },
    };
    let rows_independent = formats.first().is_none_or(|f| pass_class(*f));
    memory::Plan::new(
        limit,
        model.weight_bytes(),
        batch_rows,
        t,
        rows_independent,
        &|r| model.memory_needs(&shape(r)),
        &|r| scorer_layer_bytes(model, formats.len(), &model.memory_needs(&shape(r))),
    )
}

/// The `gradient` scores of each format of `formats` (all of one [`pass_class`]): per
/// recipe, Σ over members and the first `score_steps` batches. Calibrates first when a
/// format has static input ranges.
///
/// Work: per score batch one unquantized forward and one backward, then per linear
/// `Y_q = q(X)·q(W)ᵀ` on the rows whose gradient is not all zero. With static input ranges,
/// `Y_q` needs every batch calibrated first, so the calibration forwards of the score
/// batches are kept (as many as the memory plan allows) and reused for the backward
/// instead of running the forward a second time; the other batches are forwarded again.
/// ModelOpt runs the calibration forward and a separate scoring forward for every score
/// batch.
///
/// Memory ([`memory::Plan`], within `limit`): the weights, once; per kept forward each
/// decoder layer's input only; in the backward one decoder layer at a time, recomputed
/// from its input, with its Linears' output gradients and their fake-quantized weights,
/// prepared when the backward reaches them and dropped after; the head over chunks of
/// positions. A batch that does not fit whole is scored in slices of its rows when rows
/// are independent (the same scores: each slice's loss gradient is scaled to the batch's).
///
/// Several formats share the pass: one calibration forward (every static-range format's
/// input ranges observed on it), one forward and one backward per score batch, then per
/// linear each format's `Y_q` and score. Each format gets the bits it gets scored alone:
/// the unquantized passes do not depend on the format, and each format's arithmetic and
/// summation order are its own.
pub fn gradient_scores(
    model: &dyn ScoreModel,
    formats: &[&dyn ScoreFormat],
    recipes: &[Recipe],
    batches: &[Batch],
    score_steps: usize,
    limit: Option<u64>,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f64>>> {
    let Some(&format) = formats.first() else { return Ok(Vec::new()) };
    if let Some(f) = formats.iter().find(|f| pass_class(**f) != pass_class(format)) {
        bail!(
            "internal error: `{}` and `{}` cannot share a scoring pass (one quantizes inputs with a dynamic range)",
            format.display_name(),
            f.display_name()
        );
    }
    let score_steps = score_steps.min(batches.len());
    let half = matches!(model.dtype_name(), "bf16" | "f16");
    // Integer products read f32 outputs and gradients: f32 models only.
    let f32_model = model.dtype_name() == "f32";
    let scored: std::collections::HashSet<&str> =
        recipes.iter().flat_map(|r| r.members.iter().map(String::as_str)).collect();
    let prepare = |m: &str| -> Result<Vec<Prepared>> {
        let w = model.weight(m)?;
        check_finite(&w, &format!("the weight of linear `{m}`"))?;
        formats
            .iter()
            .map(|&format| {
                let int_products = f32_model && format.quantizes_input();
                if int_products {
                    if let Some(int_w) =
                        format.quant_weight_codes(m, &w)?.and_then(|c| int_product::PackedWeight::new(&c))
                    {
                        return Ok(Prepared { wq: None, dw: None, int_w: Some(int_w) });
                    }
                }
                let wq = format.quant_weight(m, &w)?;
                // From the exact f32 `Wq`: rounding it to half precision first would add that
                // rounding to every quantization error.
                let dw = if half { Some(diff_in(&wq, &w, w.dtype())?.contiguous()?) } else { None };
                Ok(Prepared { wq: Some(wq.to_dtype(w.dtype())?.contiguous()?), dw, int_w: None })
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("fake-quantizing the weight of `{m}`"))
    };
    let rows_independent = pass_class(format);
    // The formats whose static input ranges are calibrated first (on one forward for all).
    let calibrated: Vec<&dyn ScoreFormat> = formats.iter().copied().filter(|f| f.input_needs_calibration()).collect();
    let mut plan = gradient_plan(model, formats, batches, limit)?;
    let pieces: Vec<Piece> = batches.iter().enumerate().flat_map(|(bi, b)| Piece::split(bi, b, plan.rows)).collect();
    let n_score = pieces.iter().filter(|p| p.batch < score_steps).count();
    // Forwards are kept from calibration only when inputs are calibrated, and only the
    // score batches'.
    plan.kept_forwards = if calibrated.is_empty() { 1 } else { plan.kept_forwards.min(n_score).max(1) };
    progress.note(&format!("score: {}", plan.describe()));
    let mut kept: Vec<Option<KeptForward>> = (0..n_score).map(|_| None).collect();
    if !calibrated.is_empty() {
        // The score pieces whose calibration forward is kept: as many as the plan holds.
        let n_keep = plan.kept_forwards.min(n_score);
        if n_keep < n_score {
            progress.note(&format!(
                "score: keeping {n_keep} of {n_score} score forwards from calibration (the memory limit holds \
                 {} batches' checkpoints), forwarding the other {} again",
                plan.kept_forwards,
                n_score - n_keep
            ));
        }
        progress.phase("calibrate", Some(pieces.len() as u64));
        for (pi, p) in pieces.iter().enumerate() {
            let bi = p.batch;
            progress.detail(&format!("calibrate: batch {}/{}", pi + 1, pieces.len()));
            let mut sink = |name: &str, x: &Tensor| calibrated.iter().try_for_each(|f| observe(*f, name, x, bi));
            if pi < n_keep {
                kept[pi] = Some(
                    model
                        .forward_keep(&p.rows, &mut sink)
                        .with_context(|| format!("calibration forward, batch {bi}"))?,
                );
            } else {
                model.forward_inputs(&p.rows, &mut sink).with_context(|| format!("calibration forward, batch {bi}"))?;
            }
            progress.advance(1);
        }
    }
    // Rows (token positions) whose output gradient is exactly zero add exactly zero to the
    // score: the difference is computed on the other rows only (left pads whose next label
    // is a pad — most rows of short captions padded to 512).
    let row_subset = rows_independent;
    let mut per_linear: Vec<HashMap<String, f64>> = vec![HashMap::new(); formats.len()];
    progress.phase("score (gradient)", Some((n_score * scored.len()) as u64));
    for (pi, piece) in pieces[..n_score].iter().enumerate() {
        let started = std::time::Instant::now();
        let (bi, b) = (piece.batch, &piece.rows);
        let fw = match kept[pi].take() {
            Some(fw) => fw,
            None => {
                progress.detail(&format!("score: batch {}/{n_score}: forward", pi + 1));
                model.forward_keep(b, &mut |_, _| Ok(())).with_context(|| format!("score forward, batch {bi}"))?
            }
        };
        progress.detail(&format!("score: batch {}/{n_score}: head", pi + 1));
        // Fake-quantized inputs (f32) and input codes (integer products), each made once per
        // input and format.
        let mut xq_cache: Vec<LastInput<Tensor>> = formats.iter().map(|_| LastInput::default()).collect();
        let mut codes_cache: Vec<LastInput<Option<std::rc::Rc<int_product::InputCodes>>>> =
            formats.iter().map(|_| LastInput::default()).collect();
        let mut on_linear = |name: &str, x: &Tensor, y: &Tensor, g: &Tensor| -> Result<()> {
            if !scored.contains(name) {
                return Ok(());
            }
            progress.detail(&format!("score: batch {}/{n_score}: {name}", pi + 1));
            // Made when the backward reaches the Linear, dropped after: never the whole
            // model's at once (re-making them per batch costs a few percent of a batch).
            let p = prepare(name)?;
            let rows = if row_subset { nonzero_rows(g)? } else { None };
            for (fi, &format) in formats.iter().enumerate() {
                let s = linear_score(
                    model,
                    format,
                    name,
                    &p[fi],
                    (x, y, g),
                    rows.as_deref(),
                    format.quantizes_input(),
                    (&mut xq_cache[fi], &mut codes_cache[fi]),
                )?;
                if !s.is_finite() {
                    bail!("the score of linear `{name}` is not finite (batch {bi}): its input or gradient has NaN/Inf");
                }
                *per_linear[fi].entry(name.to_string()).or_insert(0.0) += s;
            }
            progress.advance(1);
            Ok(())
        };
        model
            .backward_linears(b, fw, piece.loss_scale, plan.head_rows, &mut on_linear)
            .with_context(|| format!("score backward, batch {bi}"))?;
        // On long runs, each batch's time (what the bar's ETA extrapolates).
        let secs = started.elapsed().as_secs_f64();
        if secs >= 30.0 {
            progress.note(&format!("score: batch {}/{n_score} scored in {secs:.0} s", pi + 1));
        }
    }
    per_linear
        .iter()
        .map(|per_linear| {
            recipes
                .iter()
                .map(|r| {
                    r.members
                        .iter()
                        .map(|m| per_linear.get(m).copied().with_context(|| format!("linear `{m}` got no gradient")))
                        .sum()
                })
                .collect()
        })
        .collect()
}

/// One format's score of one linear on one batch: `(x, y, g)` are its input, unquantized
/// output and `dL/dY`; `rows` the rows to score (all when `None`).
#[allow(clippy::too_many_arguments)]
fn linear_score(
    model: &dyn ScoreModel,
    format: &dyn ScoreFormat,
    name: &str,
    p: &Prepared,
    (x, y, g): (&Tensor, &Tensor, &Tensor),
    rows: Option<&[u32]>,
    quant_input: bool,
    (xq_cache, codes_cache): (&mut LastInput<Tensor>, &mut LastInput<Option<std::rc::Rc<int_product::InputCodes>>>),
) -> Result<f64> {
    // Both operands on 8-bit integer grids: the score from the codes (exact integer
    // sums), without forming Y_q or copying the picked rows.
    if let Some(pw) = &p.int_w {
        let codes = codes_cache.get(x, format.input_amax(name), || {
            Ok(format
                .quant_input_codes(name, x)
                .with_context(|| format!("fake-quantizing the input of `{name}`"))?
                .and_then(|c| int_product::InputCodes::new(&c))
                .map(std::rc::Rc::new))
        })?;
        let score = codes
            .and_then(|c| f32_data::borrow2(g, y, |gs, ys| int_product::product_score(&c, rows, pw, gs, ys)).flatten());
        if let Some(s) = score {
            return Ok(s);
        }
    }
    let rows_t = rows.map(|r| Tensor::from_slice(r, r.len(), g.device())).transpose()?;
    let pick = |t: &Tensor| -> Result<Tensor> {
        Ok(match &rows_t {
            Some(r) => t.index_select(r, 0)?,
            None => t.clone(),
        })
    };
    let g = pick(g)?;
    let x_in = x;
    let x = if quant_input {
        // f32, exact (see `dw` in `gradient_scores`).
        let xq = xq_cache.get(x, format.input_amax(name), || {
            format.quant_input(name, x).with_context(|| format!("fake-quantizing the input of `{name}`"))
        })?;
        pick(&xq)?
    } else {
        pick(x)?
    };
    let wq = match &p.wq {
        Some(wq) => wq.clone(),
        // Only when the integer product above did not apply.
        None => format.quant_weight(name, &model.weight(name)?)?.contiguous()?,
    };
    Ok(match &p.dw {
        Some(dw) => {
            let x0 = pick(x_in)?;
            let dx = if quant_input { Some(diff_in(&x, &x0, x0.dtype())?) } else { None };
            grad_score(&g, &half_precision_diff(&x0, dx.as_ref(), &wq, dw)?)?
        }
        None => {
            // Y_q with the same kernel the model computed Y with, as ModelOpt runs
            // F.linear twice.
            let y_q = qpipe_model::matmul_xwt(&x.to_dtype(wq.dtype())?, &wq)?;
            gradient_score(&g, &y_q, &pick(y)?)?
        }
    })
}

/// The unquantized side of a KL divergence: per position, the log-probabilities and
/// probabilities of the vocabulary in f64, from logits `[rows, V]`.
pub struct LogProbs {
    vocab: usize,
    log_p: Vec<f64>,
    p: Vec<f64>,
}

/// `(max, log Σ exp(x − max))` of one row, in f64.
fn row_logsumexp<T: Copy + Into<f64>>(row: &[T]) -> (f64, f64) {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b.into()));
    (m, row.iter().map(|&v| (v.into() - m).exp()).sum::<f64>().ln())
}

/// `f` on the values of `t`: as f64 when `t` is f64 (an f64 model), else as f32 (in place
/// when they are, widened from half precision otherwise).
fn with_row_values<R>(t: &Tensor, f: impl RowsFn<R>) -> Result<R> {
    if t.dtype() == DType::F64 {
        return Ok(f.call(&t.flatten_all()?.to_vec1::<f64>()?));
    }
    f32_data::with_values(t, |v| f.call(v))
}

/// A computation over a tensor's values in either float type (see [`with_row_values`]).
trait RowsFn<R> {
    fn call<T: Copy + Into<f64> + Sync>(self, values: &[T]) -> R;
}

struct LogSoftmax(usize);

impl RowsFn<(Vec<f64>, Vec<f64>)> for LogSoftmax {
    fn call<T: Copy + Into<f64> + Sync>(self, x: &[T]) -> (Vec<f64>, Vec<f64>) {
        let (mut log_p, mut p) = (vec![0f64; x.len()], vec![0f64; x.len()]);
        let v = self.0.max(1);
        x.par_chunks(v).zip(log_p.par_chunks_mut(v)).zip(p.par_chunks_mut(v)).for_each(|((row, lp), p)| {
            let (m, lse) = row_logsumexp(row);
            for ((lp, p), &x) in lp.iter_mut().zip(p.iter_mut()).zip(row) {
                *lp = x.into() - m - lse;
                *p = lp.exp();
            }
        });
        (log_p, p)
    }
}

struct KlRows<'a>(&'a LogProbs);

impl RowsFn<Result<Vec<f64>>> for KlRows<'_> {
    fn call<T: Copy + Into<f64> + Sync>(self, q: &[T]) -> Result<Vec<f64>> {
        let me = self.0;
        if q.len() != me.p.len() {
            bail!("logits of {} values, the unquantized ones had {}", q.len(), me.p.len());
        }
        let v = me.vocab.max(1);
        Ok(q.par_chunks(v)
            .zip(me.log_p.par_chunks(v))
            .zip(me.p.par_chunks(v))
            .map(|((q, lp), p)| {
                let (m, lse) = row_logsumexp(q);
                q.iter().zip(lp).zip(p).map(|((&q, &lp), &p)| p * (lp - (q.into() - m - lse))).sum::<f64>()
            })
            .collect())
    }
}

impl LogProbs {
    /// Log-softmax over the last dimension of `logits` (computed in f64).
    pub fn new(logits: &Tensor) -> Result<Self> {
        let vocab = *logits.dims().last().context("logits have no dimensions")?;
        let (log_p, p) = with_row_values(logits, LogSoftmax(vocab))?;
        Ok(Self { vocab, log_p, p })
    }

    /// Per position, `Σ_v p · (log p − log q)` in f64, with `q` the softmax of `logits_q`
    /// (same shape as the unquantized logits). One fused pass, parallel over positions.
    pub fn kl_rows(&self, logits_q: &Tensor) -> Result<Vec<f64>> {
        with_row_values(logits_q, KlRows(self))?
    }

    /// `Σ p · (log p − log q)` over every position and the vocabulary:
    /// `F.kl_div(log q, log p, reduction="sum", log_target=True)`, summed over positions
    /// in order.
    pub fn kl_from_logits(&self, logits_q: &Tensor) -> Result<f64> {
        Ok(self.kl_rows(logits_q)?.iter().sum())
    }
}

/// Positions per head chunk of the `kl_div` scorer within `limit`: the unquantized and
/// quantized logits of a chunk (f32) and the unquantized log-probabilities and
/// probabilities (f64), beside the weights and one forward's layer inputs and layer.
fn kl_head_rows(model: &dyn ScoreModel, b: &Batch, limit: Option<u64>) -> Result<usize> {
    let n = b.input_ids.len() * b.input_ids.first().map_or(0, Vec::len);
    let Some(limit) = limit else { return Ok(n.max(1)) };
    let needs = model.memory_needs(b);
    let per_row = 24 * model.vocab_size() as u64;
    let fixed = model.weight_bytes() + needs.checkpoints + needs.head_fixed;
    let rows = limit.saturating_sub(fixed + needs.layer) / per_row.max(1);
    if rows == 0 {
        bail!(
            "kl_div scoring needs {:.1} GiB for one position of the head beside the weights and one forward ({:.1} GiB), \
             but the memory limit is {:.1} GiB; raise `autoquant.memory_limit` or lower `dataset.calib_seq_len`",
            per_row as f64 / GIB,
            (fixed + needs.layer) as f64 / GIB,
            limit as f64 / GIB
        );
    }
    Ok((rows as usize).min(n).max(1))
}

const GIB: f64 = (1u64 << 30) as f64;

/// The `kl_div` scores of each format of `formats`: per recipe, Σ over score batches.
///
/// Per batch one unquantized forward, then one forward per recipe with the recipe's linears
/// replaced, resumed at the first decoder layer the recipe touches
/// ([`ScoreModel::hidden_resumed`]): the same hidden states as a whole forward, with the
/// layers before the recipe taken from the unquantized pass. The head runs over chunks of
/// positions sized to `limit` ([`kl_head_rows`]): the unquantized log-probabilities of a
/// chunk are computed once per batch when the whole batch is one chunk, else per chunk
/// and recipe — never the whole batch's `[N, V]` when it does not fit. The per-position
/// values and their sum in position order are the same at every chunk size. The
/// unquantized forward serves every format; each format's scores are the bits it gets alone.
pub fn kl_div_scores(
    model: &dyn ScoreModel,
    formats: &[&dyn ScoreFormat],
    recipes: &[Recipe],
    batches: &[Batch],
    limit: Option<u64>,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f64>>> {
    // One closure per linear that fake-quantizes its input with its calibrated range.
    type InputFn<'f> = Box<dyn Fn(&Tensor) -> Result<Tensor> + Sync + 'f>;
    let mut input_fns: Vec<HashMap<String, InputFn<'_>>> = Vec::new();
    for &format in formats {
        let mut fns: HashMap<String, InputFn<'_>> = HashMap::new();
        if format.quantizes_input() {
            for r in recipes {
                for m in &r.members {
                    let name = m.clone();
                    fns.insert(
                        m.clone(),
                        Box::new(move |x: &Tensor| Ok(format.quant_input(&name, x)?.to_dtype(x.dtype())?)),
                    );
                }
            }
        }
        input_fns.push(fns);
    }
    let mut scores = vec![vec![0.0; recipes.len()]; formats.len()];
    progress.phase("score (kl_div)", Some((batches.len() * recipes.len() * formats.len()) as u64));
    for (bi, b) in batches.iter().enumerate() {
        let chunk = kl_head_rows(model, b, limit)?;
        let (hidden, kept) = model.forward_resumable(b).with_context(|| format!("unquantized forward, batch {bi}"))?;
        let n = hidden.dims().first().copied().unwrap_or(0);
        let chunks: Vec<std::ops::Range<usize>> = (0..n).step_by(chunk).map(|r0| r0..(r0 + chunk).min(n)).collect();
        if bi == 0 && chunks.len() > 1 {
            progress.note(&format!(
                "score: kl_div: the head over {} chunks of {chunk} positions per batch (memory limit)",
                chunks.len()
            ));
        }
        let reference = |r: &std::ops::Range<usize>| -> Result<LogProbs> {
            let logits = model.head_logits(&hidden, r.clone())?;
            check_finite(&logits, &format!("the unquantized logits of batch {bi}"))?;
            LogProbs::new(&logits)
        };
        // One chunk: the reference once per batch.
        let whole = if chunks.len() == 1 { Some(reference(&chunks[0])?) } else { None };
        for fi in 0..formats.len() {
            for (ri, r) in recipes.iter().enumerate() {
                progress.detail(&format!("score: batch {}/{}: {}", bi + 1, batches.len(), r.name));
                // The recipe's quantized weights, made when needed (never the whole model's at once).
                let format = formats[fi];
                let qweights = prepare_weights(model, std::slice::from_ref(r), |m, w| {
                    Ok(format.quant_weight(m, &w)?.to_dtype(w.dtype())?)
                })?;
                let mut ov: HashMap<String, LinearOverride<'_>> = HashMap::new();
                for m in &r.members {
                    ov.insert(
                        m.clone(),
                        LinearOverride { weight: qweights[m].clone(), input: input_fns[fi].get(m).map(|f| f.as_ref()) },
                    );
                }
                let hq = model
                    .hidden_resumed(b, &kept, &ov)
                    .with_context(|| format!("forward with `{}` quantized, batch {bi}", r.name))?;
                let mut rows = Vec::with_capacity(n);
                for c in &chunks {
                    let lq = model.head_logits_with(&hq, c.clone(), &ov)?;
                    match &whole {
                        Some(lp) => rows.extend(lp.kl_rows(&lq)?),
                        None => rows.extend(reference(c)?.kl_rows(&lq)?),
                    }
                }
                let s: f64 = rows.iter().sum();
                if !s.is_finite() {
                    bail!("the KL divergence with `{}` quantized is not finite (batch {bi})", r.name);
                }
                scores[fi][ri] += s;
                progress.advance(1);
            }
        }
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::backend::{InputSink, LinearSink};
    use crate::score::recipes::LinearInfo;
    use candle_core::Device;
    use qpipe_contract::Silent;

    /// One linear `y = x wᵀ` on fixed inputs, with a fixed output gradient.
    struct Toy {
        x: Tensor,
        w: Tensor,
        g: Tensor,
    }

    impl ScoreModel for Toy {
        fn linears(&self) -> Vec<LinearInfo> {
            vec![LinearInfo { name: "layers.0.mlp.down_proj".into(), weight_numel: self.w.elem_count() }]
        }
        fn weight(&self, _: &str) -> Result<Tensor> {
            Ok(self.w.clone())
        }
        fn dtype_name(&self) -> &'static str {
            "f32"
        }
        fn available_memory(&self) -> Option<u64> {
            None
        }
        fn forward_inputs(&self, _: &Batch, sink: &mut InputSink<'_>) -> Result<()> {
            sink("layers.0.mlp.down_proj", &self.x)
        }
        fn forward_keep(&self, b: &Batch, sink: &mut InputSink<'_>) -> Result<KeptForward> {
            self.forward_inputs(b, sink)?;
            Ok(Box::new(self.x.matmul(&self.w.t()?)?))
        }
        fn weight_bytes(&self) -> u64 {
            8
        }
        fn memory_needs(&self, _: &Batch) -> memory::Needs {
            memory::Needs { checkpoints: 8, layer: 0, head_fixed: 0, head_per_row: 0, linear_io: 0 }
        }
        fn backward_linears(
            &self,
            _: &Batch,
            kept: KeptForward,
            _: f64,
            _: usize,
            sink: &mut LinearSink<'_>,
        ) -> Result<f64> {
            let y = kept.downcast::<Tensor>().unwrap();
            sink("layers.0.mlp.down_proj", &self.x, &y, &self.g)?;
            Ok(0.0)
        }
        fn forward_resumable(&self, _: &Batch) -> Result<(Tensor, KeptForward)> {
            unreachable!()
        }
        fn hidden_resumed(
            &self,
            _: &Batch,
            _: &KeptForward,
            _: &HashMap<String, LinearOverride<'_>>,
        ) -> Result<Tensor> {
            unreachable!()
        }
        fn head_logits(&self, _: &Tensor, _: std::ops::Range<usize>) -> Result<Tensor> {
            unreachable!()
        }
        fn vocab_size(&self) -> usize {
            1
        }
    }

    /// Rounds weights to multiples of 0.5 (inputs: to multiples of 1 with a calibrated range).
    struct Halves {
        amax: std::sync::Mutex<f32>,
    }

    impl ScoreFormat for Halves {
        fn display_name(&self) -> String {
            "CUSTOM_0(effective-bits: 8.0)".into()
        }
        fn effective_bits(&self) -> f64 {
            8.0
        }
        fn quantizes_input(&self) -> bool {
            true
        }
        fn input_needs_calibration(&self) -> bool {
            true
        }
        fn observe_input(&self, _: &str, x: &Tensor) -> Result<()> {
            let m = x.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            if !x.sum_all()?.to_scalar::<f32>()?.is_finite() {
                bail!("the input contains NaN or infinite values");
            }
            let mut a = self.amax.lock().unwrap();
            *a = a.max(m);
            Ok(())
        }
        fn input_amax(&self, _: &str) -> Option<f32> {
            Some(*self.amax.lock().unwrap())
        }
        fn quant_weight(&self, _: &str, w: &Tensor) -> Result<Tensor> {
            Ok(((w * 2.0)?.round()? / 2.0)?)
        }
        fn quant_input(&self, _: &str, x: &Tensor) -> Result<Tensor> {
            Ok(x.round()?)
        }
    }

    fn batch() -> Batch {
        Batch::text(vec![vec![1, 2]], vec![vec![1, 1]], 0)
    }

    #[test]
    fn gradient_score_by_hand() {
        let dev = Device::Cpu;
        // x = [[1.2, -0.4], [0.0, 2.0]], w = [[0.3, 0.9]] → wq = [[0.5, 1.0]], xq = [[1, 0], [0, 2]].
        let x = Tensor::new(&[[1.2f32, -0.4], [0.0, 2.0]], &dev).unwrap();
        let w = Tensor::new(&[[0.3f32, 0.9]], &dev).unwrap();
        // The second row has a zero gradient: it must not count.
        let g = Tensor::new(&[[2.0f32], [0.0]], &dev).unwrap();
        let toy = Toy { x, w, g };
        let fmt = Halves { amax: std::sync::Mutex::new(0.0) };
        let recipes = crate::score::recipes::group(&toy.linears());
        // Both score forwards kept from calibration (limit: weights 8 + the scorer's
        // prepared weight 8 + 2 checkpoints of 8), one kept, no limit (one): the same scores.
        for budget in [Some(32), Some(24), None] {
            let fmt = Halves { amax: std::sync::Mutex::new(0.0) };
            let s = gradient_scores(&toy, &[&fmt], &recipes, &[batch(), batch(), batch()], 2, budget, &Silent)
                .unwrap()
                .remove(0);
            assert_eq!(fmt.input_amax("").unwrap(), 2.0);
            // y = 1.2·0.3 − 0.4·0.9 = 0; y_q = 1·0.5 + 0·1.0 = 0.5; (2 · 0.5)² = 1 per batch.
            assert!((s[0] - 2.0).abs() < 1e-6, "{s:?}");
        }
        calibrate_inputs(&toy, &[&fmt], &[batch()], &Silent).unwrap();
        assert_eq!(fmt.input_amax("").unwrap(), 2.0);
    }

    #[test]
    fn nan_activation_names_the_layer() {
        let dev = Device::Cpu;
        let toy = Toy {
            x: Tensor::new(&[[f32::NAN, 1.0]], &dev).unwrap(),
            w: Tensor::new(&[[1.0f32, 1.0]], &dev).unwrap(),
            g: Tensor::new(&[[1.0f32]], &dev).unwrap(),
        };
        let fmt = Halves { amax: std::sync::Mutex::new(0.0) };
        let e = format!("{:#}", calibrate_inputs(&toy, &[&fmt], &[batch()], &Silent).unwrap_err());
        assert!(e.contains("layers.0.mlp.down_proj") && e.contains("NaN"), "{e}");
    }

    #[test]
    fn clamp_and_kl_by_hand() {
        let dev = Device::Cpu;
        let g = Tensor::new(&[1e6f32, 3.0], &dev).unwrap();
        let d = Tensor::new(&[1e6f32, 0.5], &dev).unwrap();
        // The first product 1e12 is clamped to 1e10 before squaring; squares are f32, as
        // ModelOpt's (torch's) are.
        assert_eq!(grad_score(&g, &d).unwrap(), f64::from(1e10f32 * 1e10f32) + 2.25);
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        // The fused path from logits: p = softmax([0, 0]), q = softmax([0, ln 3]) = [1/4, 3/4].
        let lp = LogProbs::new(&Tensor::new(&[[0.0f32, 0.0]], &dev).unwrap()).unwrap();
        let q = Tensor::new(&[[0.0f32, 3f32.ln()]], &dev).unwrap();
        assert!((lp.kl_from_logits(&q).unwrap() - want).abs() < 1e-7);
        assert_eq!(lp.kl_from_logits(&Tensor::new(&[[5.0f32, 5.0]], &dev).unwrap()).unwrap(), 0.0);
    }

    #[test]
    fn gradient_score_matches_composed_formula() {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 1.0, (33, 70), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (33, 70), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (33, 70), &dev).unwrap();
        let want = (&g * (&a - &b).unwrap()).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let got = gradient_score(&g, &a, &b).unwrap();
        assert!((got - f64::from(want)).abs() / f64::from(want) < 1e-5, "{got} vs {want}");
        // tracked inputs take the composed path
        let v = candle_core::Var::from_tensor(&g).unwrap();
        let got2 = gradient_score(v.as_tensor(), &a, &b).unwrap();
        assert!((got2 - got).abs() / got < 1e-9);
        // clamping as ModelOpt does
        let big = Tensor::from_vec(vec![1e6f32, 1.0], 2, &dev).unwrap();
        let z = Tensor::zeros(2, DType::F32, &dev).unwrap();
        // 1e6·1e12 clamps to 1e10; squares are f32 as in torch
        let want = f64::from(1e10f32 * 1e10f32) + f64::from(1e6f32 * 1e6f32);
        assert_eq!(gradient_score(&big, &(&big * 1e6).unwrap(), &z).unwrap(), want);
    }
}
