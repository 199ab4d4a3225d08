//! Glue between the scorer and the modules other parts of qpipe own: the checkpoint
//! locator, the calibration `.pt` reader, the language model, the fake-quant formats and
//! the torch `.pt` writer. Kept here so the scorer itself depends only on [`super::backend`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Tensor};

use super::backend::{Batch, InputSink, KeptForward, LinearOverride, LinearSink, ScoreFormat, ScoreModel};
use super::recipes::LinearInfo;
use super::FormatParams;
use qpipe_contract::Job;
use qpipe_model::{self as model, TextModel};
use qpipe_quant as quant;

/// The checkpoint folder of a job, from its `checkpoint` locator (local or hub cache).
pub fn checkpoint_dir(job: &Job<'_>) -> Result<PathBuf> {
    let loc = job.locators.get("checkpoint").context("`score` job has no `checkpoint` locator")?;
    crate::io::checkpoint::resolve_dir(job.root, loc)
}

/// The language model behind the scorer: the candle Qwen3-VL text model, f32 on the CPU.
pub fn load_model(dir: &Path) -> Result<Box<dyn ScoreModel>> {
    load_model_with(dir, DType::F32)
}

/// [`load_model`] in another dtype (f64 for rounding-noise-free parity checks).
pub fn load_model_with(dir: &Path, dtype: DType) -> Result<Box<dyn ScoreModel>> {
    load_model_on(dir, dtype, &candle_core::Device::Cpu)
}

/// [`load_model`] in `dtype` on `device` (a GPU with the `cuda` feature).
pub fn load_model_on(dir: &Path, dtype: DType, device: &candle_core::Device) -> Result<Box<dyn ScoreModel>> {
    let m = TextModel::load_with(dir, dtype, device)
        .with_context(|| format!("loading the language model of {}", dir.display()))?;
    Ok(Box::new(m))
}

fn model_batch(b: &Batch) -> Result<model::Batch> {
    model::Batch::new(b.input_ids.clone(), b.attention_mask.clone())
}

impl ScoreModel for TextModel {
    fn linears(&self) -> Vec<LinearInfo> {
        (0..self.num_linears())
            .map(|i| LinearInfo {
                name: self.linear_names()[i].clone(),
                weight_numel: self.linear_weight(i).elem_count(),
            })
            .collect()
    }

    /// In the compute dtype (a half-precision checkpoint's weights are held as stored).
    fn weight(&self, name: &str) -> Result<Tensor> {
        let w = self.linear_weight_by_name(name).with_context(|| format!("the model has no linear `{name}`"))?;
        Ok(w.to_dtype(self.dtype())?)
    }

    fn dtype_name(&self) -> &'static str {
        match self.dtype() {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "other",
        }
    }

    fn available_memory(&self) -> Option<u64> {
        qpipe_compute::device::available_bytes(self.device())
    }

    fn forward_inputs(&self, batch: &Batch, sink: &mut InputSink<'_>) -> Result<()> {
        let mut tap = |_: usize, name: &str, x: &Tensor, _: &Tensor, _: &Tensor| -> Result<Option<Tensor>> {
            sink(name, x)?;
            Ok(None)
        };
        // The Linears' inputs are all a calibration pass needs: no head, no logits.
        self.forward_no_head(&model_batch(batch)?, &mut tap)?;
        Ok(())
    }

    fn forward_keep(&self, batch: &Batch, sink: &mut InputSink<'_>) -> Result<KeptForward> {
        let mut tap = |_: usize, name: &str, x: &Tensor, _: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
            if !y.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
                bail!("the output of linear `{name}` contains NaN or Inf");
            }
            sink(name, x)?;
            Ok(None)
        };
        Ok(Box::new(self.forward_checkpointed(&model_batch(batch)?, &mut tap)?))
    }

    fn weight_bytes(&self) -> u64 {
        self.weights().bytes()
    }

    fn memory_needs(&self, batch: &Batch) -> model::memory::Needs {
        let (b, t) = (batch.input_ids.len(), batch.input_ids.first().map_or(0, Vec::len));
        TextModel::memory_needs(self, b, t)
    }

    fn backward_linears(
        &self,
        batch: &Batch,
        kept: KeptForward,
        loss_scale: f64,
        head_rows: usize,
        sink: &mut LinearSink<'_>,
    ) -> Result<f64> {
        let Ok(fw) = kept.downcast::<model::ForwardCache>() else {
            bail!("internal error: a kept forward of another model was passed to the Qwen3-VL backward");
        };
        let names = self.linear_names();
        self.backward_linears_ce(
            *fw,
            &batch.input_ids,
            Some(batch.pad_token_id),
            loss_scale,
            head_rows,
            &mut |idx, x, y, dy| sink(&names[idx], x, y, dy),
        )
    }

    fn forward_resumable(&self, batch: &Batch) -> Result<(Tensor, KeptForward)> {
        let (hidden, layer_inputs) = self.hidden_and_layer_inputs(&model_batch(batch)?, &mut model::NoTap)?;
        Ok((hidden, Box::new(layer_inputs)))
    }

    /// Starts at the first decoder layer an override touches, from the residual stream the
    /// unquantized forward recorded there: the layers before it are unchanged, so the
    /// hidden states are those of a whole forward, bit for bit, for about half the work on
    /// average.
    fn hidden_resumed(
        &self,
        batch: &Batch,
        kept: &KeptForward,
        overrides: &HashMap<String, LinearOverride<'_>>,
    ) -> Result<Tensor> {
        let Some(layer_inputs) = kept.downcast_ref::<Vec<Tensor>>() else {
            bail!("internal error: a kept forward of another kind was passed to the Qwen3-VL resumed forward");
        };
        let mut first = usize::MAX;
        for name in overrides.keys() {
            let idx = self.linear_index(name).with_context(|| format!("the model has no linear `{name}`"))?;
            first = first.min(idx / model::LINEARS_PER_LAYER);
        }
        let mut tap = |_: usize, name: &str, x: &Tensor, _: &Tensor, _: &Tensor| -> Result<Option<Tensor>> {
            let Some(o) = overrides.get(name) else { return Ok(None) };
            let xq = match o.input {
                Some(f) => f(x)?,
                None => x.clone(),
            };
            Ok(Some(model::matmul_xwt(&xq, &o.weight)?))
        };
        let mb = model_batch(batch)?;
        let first = first.min(layer_inputs.len().saturating_sub(1));
        match layer_inputs.get(first) {
            Some(h) => self.hidden_from(&mb, first, h, &mut tap),
            None => bail!("internal error: the resumable forward kept no layer inputs"),
        }
    }

    fn head_logits(&self, hidden: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
        TextModel::head_logits(self, hidden, rows)
    }

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
}

/// The fake-quant format of a run, from the `quant` module.
pub fn load_format(p: &FormatParams) -> Result<Box<dyn ScoreFormat>> {
    let overrides = match &p.quant_cfg_overrides {
        Value::Null => serde_json::Map::new(),
        Value::Object(m) => m.clone(),
        other => bail!("key `quant_granularity.quant_cfg_overrides`: expected a mapping, found {other}"),
    };
    let cfg = quant::config_for(&p.name, &overrides)?;
    Ok(Box::new(QuantFormat::new(cfg)))
}

/// A `quant::QuantConfig` as the scorer uses it, with one max-calibration observer per linear.
pub struct QuantFormat {
    cfg: quant::QuantConfig,
    weight: quant::Quantizer,
    input: quant::Quantizer,
    observers: Mutex<HashMap<String, quant::AmaxObserver>>,
    /// The input last observed (by tensor id) and its ranges.
    last_ranges: Mutex<Option<(candle_core::TensorId, quant::AmaxKind, Vec<f32>)>>,
}

impl QuantFormat {
    pub fn new(cfg: quant::QuantConfig) -> Self {
        let (weight, input) = (cfg.weight_quantizer(), cfg.input_quantizer());
        Self { cfg, weight, input, observers: Mutex::new(HashMap::new()), last_ranges: Mutex::new(None) }
    }

    /// Warnings the format's overlays produced (printed by the stage).
    pub fn warnings(&self) -> &[String] {
        &self.cfg.warnings
    }

    fn amax(&self, linear: &str) -> Option<quant::Amax> {
        self.observers.lock().expect("observer lock").get(linear).and_then(|o| o.amax())
    }

    /// `(out, in)` of a linear's weight, checked against the format (block sizes).
    fn weight_dims(&self, linear: &str, w: &Tensor) -> Result<(usize, usize)> {
        let (o, i) = w.dims2()?;
        self.cfg.check_shape(i, o).with_context(|| format!("linear `{linear}`"))?;
        Ok((o, i))
    }

    /// The calibrated input ranges of `linear`; an error when the format needs them and
    /// calibration never saw the linear.
    fn calibrated_amax(&self, linear: &str) -> Result<Option<quant::Amax>> {
        let amax = self.amax(linear);
        if self.input.needs_calibration() && amax.is_none() {
            bail!("linear `{linear}`: its input range was never calibrated");
        }
        Ok(amax)
    }
}

impl ScoreFormat for QuantFormat {
    fn display_name(&self) -> String {
        self.cfg.display_name()
    }
    fn effective_bits(&self) -> f64 {
        self.cfg.effective_bits()
    }
    fn quantizes_input(&self) -> bool {
        self.input.is_enabled()
    }
    fn input_needs_calibration(&self) -> bool {
        self.input.needs_calibration()
    }
    fn observe_input(&self, linear: &str, x: &Tensor) -> Result<()> {
        let Some(fresh) = self.input.observer() else { return Ok(()) };
        let (rows, cols) = x.dims2()?;
        let kind = fresh.kind();
        // q/k/v (and gate/up) read the same tensor: reduce it once. Tensor ids are never
        // reused, and a tensor's values never change.
        let mut last = self.last_ranges.lock().expect("range cache lock");
        let ranges = match &*last {
            Some((id, k, r)) if *id == x.id() && *k == kind => r.clone(),
            _ => {
                // On the tensor's device; on a GPU only the ranges come to the host.
                let (ranges, bad) = if x.device().is_cpu() {
                    qpipe_compute::f32_data::with_values(x, |v| kind.reduce(v, rows, cols))?
                } else {
                    quant::device_ranges(kind, x)?
                };
                if bad {
                    bail!("the input contains NaN or infinite values");
                }
                *last = Some((x.id(), kind, ranges.clone()));
                ranges
            }
        };
        let mut obs = self.observers.lock().expect("observer lock");
        obs.entry(linear.to_string()).or_insert(fresh).observe_ranges(ranges, rows, cols)
    }
    fn input_amax(&self, linear: &str) -> Option<f32> {
        self.amax(linear).map(|a| a.values.iter().cloned().fold(0.0, f32::max))
    }
    fn conv_as_linear_exact(&self, kernel_width: usize) -> bool {
        use quant::{AmaxKind, Scheme};
        let blocks_fit = |n: usize| n > 0 && kernel_width.is_multiple_of(n);
        let weight = match self.weight.scheme() {
            Scheme::Off => true,
            Scheme::Scaled { kind: AmaxKind::PerTensor | AmaxKind::PerRow, .. } => true,
            Scheme::Scaled { kind: AmaxKind::PerBlock(n), .. } => blocks_fit(*n),
            Scheme::Nvfp4 { block, .. } | Scheme::Mx { block, .. } => blocks_fit(*block),
            Scheme::Scaled { kind: AmaxKind::PerCol, .. } => false,
        };
        let input = match self.input.scheme() {
            Scheme::Off => true,
            Scheme::Scaled { kind: AmaxKind::PerTensor, .. } => true,
            Scheme::Scaled { kind: AmaxKind::PerBlock(n), .. } => blocks_fit(*n),
            Scheme::Nvfp4 { block, .. } | Scheme::Mx { block, .. } => blocks_fit(*block),
            Scheme::Scaled { kind: AmaxKind::PerRow | AmaxKind::PerCol, .. } => false,
        };
        weight && input
    }
    fn quant_weight(&self, linear: &str, w: &Tensor) -> Result<Tensor> {
        self.weight_dims(linear, w)?;
        self.weight.fake_quant_weight_tensor(w)
    }
    fn quant_input(&self, linear: &str, x: &Tensor) -> Result<Tensor> {
        let amax = self.calibrated_amax(linear)?;
        self.input.fake_quant_tensor(x, amax.as_ref())
    }
    fn quant_weight_codes(&self, linear: &str, w: &Tensor) -> Result<Option<quant::IntCodes>> {
        let (o, i) = self.weight_dims(linear, w)?;
        if !w.device().is_cpu() {
            return Ok(None);
        }
        qpipe_compute::f32_data::with_values(w, |v| self.weight.int_codes_weight(v, o, i))?
    }
    fn quant_input_codes(&self, linear: &str, x: &Tensor) -> Result<Option<quant::IntCodes>> {
        let amax = self.calibrated_amax(linear)?;
        if !x.device().is_cpu() {
            return Ok(None);
        }
        let (rows, cols) = quant::types::rows_cols(x.dims())?;
        qpipe_compute::f32_data::with_values(x, |v| self.input.int_codes(v, rows, cols, amax.as_ref()))?
    }
}

/// Image-text calibration batches: the build-calib `.pt`, each row's image preprocessed
/// again from the file build-calib recorded (its hash checked) with the checkpoint's
/// `preprocessor_config.json`. The loss ignores the vision tokens (labels −100 there).
pub fn load_image_batches(
    calib: &Path,
    images: &Path,
    ckpt: &Path,
    root: &Path,
    batch_size: usize,
    progress: &dyn qpipe_contract::Progress,
) -> Result<Vec<Batch>> {
    use crate::io::calib_images::{load_pixels, CalibImages};
    let set = crate::io::calib::load_calib(calib)?;
    let refs = CalibImages::read(images)?;
    if refs.samples.len() != set.n {
        bail!(
            "{}: {} images for {} samples in {}; rebuild them",
            images.display(),
            refs.samples.len(),
            set.n,
            calib.display()
        );
    }
    let processor = crate::io::image::ImageProcessorConfig::from_file(&ckpt.join("preprocessor_config.json"))?;
    progress.note(&format!("score: preprocessing the images of {} samples", set.n));
    let pixels = load_pixels(&refs, &processor, root)?;
    let rows = |v: &[u32]| -> Vec<Vec<u32>> { v.chunks(set.t).map(<[u32]>::to_vec).collect() };
    let (ids, mask) = (rows(&set.input_ids), rows(&set.attention_mask));
    // The ignored label positions' tokens (pads aside): the vision tokens.
    let mut ignored: Vec<u32> = set
        .labels
        .iter()
        .zip(&set.input_ids)
        .zip(&set.attention_mask)
        .filter(|((l, _), m)| **l == -100 && **m == 1)
        .map(|((_, &i), _)| i)
        .collect();
    ignored.sort_unstable();
    ignored.dedup();
    if let Some((l, i)) = set.labels.iter().zip(&set.input_ids).find(|(l, i)| **l != -100 && **l != i64::from(**i)) {
        bail!(
            "calibration set {}: a label {l} differs from its input id {i}; rebuild it (build-calib)",
            calib.display()
        );
    }
    let mut out = Vec::new();
    for (k, (ids, mask)) in ids.chunks(batch_size.max(1)).zip(mask.chunks(batch_size.max(1))).enumerate() {
        let first = k * batch_size.max(1);
        let images = (first..first + ids.len())
            .map(|r| {
                let p = &pixels[r];
                Ok(super::backend::RowImage {
                    pixel_values: Tensor::from_slice(
                        &p.pixel_values,
                        (p.num_patches(), p.patch_dim()),
                        &candle_core::Device::Cpu,
                    )?,
                    grid_thw: p.grid_thw,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(Batch {
            input_ids: ids.to_vec(),
            attention_mask: mask.to_vec(),
            pad_token_id: set.pad_token_id,
            ignored_token_ids: ignored.clone(),
            images,
        });
    }
    Ok(out)
}

/// Calibration batches from the build-calib `.pt`.
pub fn load_batches(path: &Path, batch_size: usize) -> Result<Vec<Batch>> {
    let set = crate::io::calib::load_calib(path)?;
    if set.n == 0 || set.t == 0 {
        bail!("calibration set {} is empty; rebuild it (build-calib) with at least one caption", path.display());
    }
    if set.labels.iter().zip(&set.input_ids).any(|(l, i)| *l != i64::from(*i)) {
        bail!(
            "calibration set {}: labels differ from input_ids; `score` computes the loss with labels = input_ids",
            path.display()
        );
    }
    let rows = |v: &[u32]| -> Vec<Vec<u32>> { v.chunks(set.t).map(<[u32]>::to_vec).collect() };
    Ok(super::make_batches(&rows(&set.input_ids), &rows(&set.attention_mask), set.pad_token_id, batch_size.max(1)))
}
