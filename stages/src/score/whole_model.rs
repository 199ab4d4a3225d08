//! The whole Qwen3-VL model as the scorer drives it (`autoquant.coverage=full`): every
//! Linear of the vision tower (the Conv3d `patch_embed.proj` as the Linear over flattened
//! patches it is), of the language model, and `lm_head`, named as ModelOpt names the
//! modules of `Qwen3VLForConditionalGeneration` (`model.visual.…`,
//! `model.language_model.…`, `lm_head`), on batches whose rows each carry an image.
//!
//! One score batch: the tower's forward (its Linears' inputs to the calibration sink),
//! the language model's checkpointed forward with the image tokens' embeddings, DeepStack
//! features and M-RoPE positions, the language model's backward (and `lm_head`'s output
//! gradient chunk by chunk), which hands out dL/d(the tower's outputs) at the image
//! positions; then, image by image, the tower's forward again keeping its activations and
//! its backward — an image's tower activations are the largest part, and images are
//! independent in the tower, so only one image's are held at a time.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::backend::{Batch, InputSink, KeptForward, LinearOverride, LinearSink, ScoreModel};
use super::recipes::LinearInfo;
use qpipe_model::vision::{Images, VisionOutput};
use qpipe_model::vl::VlModel;
use qpipe_model::{self as model, ForwardCache, NoTap, TextModel};

/// Prefix of the language model's modules in the whole model.
pub const LM_PREFIX: &str = "model.language_model.";
/// The head's module name.
pub const HEAD: &str = "lm_head";

/// The whole model, scored with its tower and head.
pub struct WholeModel {
    vl: VlModel,
    /// Seconds spent in the tower (its forwards, its backward and its Linears' scores) and
    /// in all of this model's passes, for [`ScoreModel::report`].
    tower_secs: std::cell::Cell<f64>,
    total_secs: std::cell::Cell<f64>,
}

/// Adds the seconds since `t0` to `cell`.
fn add_time(cell: &std::cell::Cell<f64>, t0: std::time::Instant) {
    cell.set(cell.get() + t0.elapsed().as_secs_f64());
}

/// Loads the whole model of a checkpoint with a vision tower.
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<WholeModel> {
    let vl = VlModel::load_with(dir, dtype, device)
        .with_context(|| format!("loading the whole model (vision tower and language model) of {}", dir.display()))?;
    Ok(WholeModel { vl, tower_secs: Default::default(), total_secs: Default::default() })
}

/// A kept forward: the language model's checkpoints and the batch it ran on (with the
/// tower's outputs).
struct Kept {
    fw: ForwardCache,
    batch: model::Batch,
}

/// A resumable forward: the batch with the tower's outputs, each decoder layer's input and
/// the final hidden states.
struct Resumable {
    batch: model::Batch,
    layer_inputs: Vec<Tensor>,
    hidden: Tensor,
}

impl WholeModel {
    /// Errors when `format` would quantize the tower's Conv3d (`patch_embed.proj`)
    /// differently as the Linear over flattened patches than ModelOpt does on the 5-D
    /// tensors ([`super::backend::ScoreFormat::conv_as_linear_exact`]).
    pub fn check_format(&self, format: &dyn super::backend::ScoreFormat) -> Result<()> {
        let p = self.vl.vision.config().patch_size;
        if !format.conv_as_linear_exact(p) {
            bail!(
                "`{}` cannot score `model.visual.patch_embed.proj` as ModelOpt does: ModelOpt quantizes that Conv3d's \
                 5-D weight and input in blocks (or per row) along the kernel width ({p} values), which its flattened \
                 Linear does not share; use a per-tensor or per-channel format for `autoquant.coverage=full`, or \
                 `autoquant.coverage=lm_only`",
                format.display_name()
            );
        }
        Ok(())
    }

    fn text(&self) -> &TextModel {
        &self.vl.text
    }

    fn images(&self, b: &Batch) -> Result<Images> {
        ensure!(
            b.images.len() == b.input_ids.len(),
            "a batch of {} rows has {} images: whole-model scoring needs image-text calibration (dataset.coco_captions)",
            b.input_ids.len(),
            b.images.len()
        );
        let pv: Vec<Tensor> = b.images.iter().map(|i| i.pixel_values.clone()).collect();
        Images::new(Tensor::cat(&pv, 0)?, b.images.iter().map(|i| i.grid_thw).collect())
    }

    /// The language model's batch with the tower's output for `b`'s images.
    fn lm_batch(&self, b: &Batch, images: &Images, out: &VisionOutput) -> Result<model::Batch> {
        let mb = model::Batch::new(b.input_ids.clone(), b.attention_mask.clone())?;
        self.vl.with_images(mb, images, out)
    }

    /// The tower's forward, its Linears' inputs to `sink`.
    fn tower(&self, images: &Images, sink: &mut InputSink<'_>) -> Result<VisionOutput> {
        let t0 = std::time::Instant::now();
        let names = self.vl.vision.linear_names();
        let mut tap = |idx: usize, _: &str, x: &Tensor, _: &Tensor, _: &Tensor| -> Result<Option<Tensor>> {
            sink(&names[idx], x)?;
            Ok(None)
        };
        let out = self.vl.vision.forward(images, &mut tap);
        add_time(&self.tower_secs, t0);
        out
    }

    /// A tap that shows the language model's Linears to `sink` under their whole-model names.
    fn lm_inputs<'a, 'b: 'a>(
        &'a self,
        sink: &'a mut InputSink<'b>,
    ) -> impl FnMut(usize, &str, &Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + use<'a, 'b> {
        let names = self.text().linear_names();
        move |idx, _, x, _, _| {
            sink(&format!("{LM_PREFIX}{}", names[idx]), x)?;
            Ok(None)
        }
    }

    /// Per image, its rows of the visual gradients (its image tokens, in order).
    fn image_rows(&self, images: &Images) -> Vec<std::ops::Range<usize>> {
        let unit = self.vl.vision.config().merge_unit();
        let mut start = 0;
        images
            .grid_thw
            .iter()
            .map(|g| {
                let n = g[0] * g[1] * g[2] / unit;
                start += n;
                start - n..start
            })
            .collect()
    }
}

/// Replaces the outputs of the overridden Linears (`y = q_in(x)·Wqᵀ`), by whole-model name.
fn override_tap<'a>(
    names: &'a [String],
    prefix: &'a str,
    overrides: &'a HashMap<String, LinearOverride<'a>>,
) -> impl FnMut(usize, &str, &Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + 'a {
    move |idx, _, x, _, _| {
        let name = format!("{prefix}{}", names[idx]);
        let Some(o) = overrides.get(&name) else { return Ok(None) };
        let xq = match o.input {
            Some(f) => f(x)?,
            None => x.clone(),
        };
        Ok(Some(model::matmul_xwt(&xq.to_dtype(o.weight.dtype())?, &o.weight)?))
    }
}

impl ScoreModel for WholeModel {
    fn linears(&self) -> Vec<LinearInfo> {
        let v = &self.vl.vision;
        let mut out: Vec<LinearInfo> = (0..v.linear_names().len())
            .map(|i| LinearInfo { name: v.linear_names()[i].clone(), weight_numel: v.linear_weight(i).elem_count() })
            .collect();
        let t = self.text();
        out.extend((0..t.num_linears()).map(|i| LinearInfo {
            name: format!("{LM_PREFIX}{}", t.linear_names()[i]),
            weight_numel: t.linear_weight(i).elem_count(),
        }));
        out.push(LinearInfo { name: HEAD.into(), weight_numel: t.weights().output_weight().elem_count() });
        out
    }

    fn weight(&self, name: &str) -> Result<Tensor> {
        let dtype = self.text().dtype();
        let w = if name == HEAD {
            self.text().weights().output_weight()
        } else if let Some(lm) = name.strip_prefix(LM_PREFIX) {
            self.text().linear_weight_by_name(lm).with_context(|| format!("the model has no linear `{name}`"))?
        } else {
            let idx = self.vl.vision.linear_index(name).with_context(|| format!("the model has no linear `{name}`"))?;
            self.vl.vision.linear_weight(idx)
        };
        Ok(w.to_dtype(dtype)?)
    }

    fn dtype_name(&self) -> &'static str {
        self.text().dtype_name()
    }

    fn available_memory(&self) -> Option<u64> {
        qpipe_compute::device::available_bytes(self.text().device())
    }

    fn forward_inputs(&self, b: &Batch, sink: &mut InputSink<'_>) -> Result<()> {
        let _total = Finally(&self.total_secs, std::time::Instant::now());
        let images = self.images(b)?;
        let out = self.tower(&images, sink)?;
        let mb = self.lm_batch(b, &images, &out)?;
        let hidden = self.text().forward_no_head(&mb, &mut self.lm_inputs(sink))?;
        sink(HEAD, &hidden)
    }

    fn forward_keep(&self, b: &Batch, sink: &mut InputSink<'_>) -> Result<KeptForward> {
        let _total = Finally(&self.total_secs, std::time::Instant::now());
        let images = self.images(b)?;
        let out = self.tower(&images, sink)?;
        let mb = self.lm_batch(b, &images, &out)?;
        let fw = self.text().forward_checkpointed(&mb, &mut self.lm_inputs(sink))?;
        sink(HEAD, fw.hidden())?;
        Ok(Box::new(Kept { fw, batch: mb }))
    }

    fn weight_bytes(&self) -> u64 {
        self.text().weights().bytes() + self.vl.vision.weights().bytes()
    }

    /// The language model's needs, its layer's working set grown by one image's tower
    /// activations (the tower's backward runs one image at a time, after the language
    /// model's).
    fn memory_needs(&self, b: &Batch) -> model::memory::Needs {
        let (rows, t) = (b.input_ids.len(), b.input_ids.first().map_or(0, Vec::len));
        let mut needs = self.text().memory_needs(rows, t);
        let widest = b.images.iter().map(|i| i.grid_thw.iter().product::<usize>()).max().unwrap_or(0);
        needs.layer = needs.layer.max(self.vl.vision.cache_bytes(widest));
        needs
    }

    fn backward_linears(
        &self,
        b: &Batch,
        kept: KeptForward,
        loss_scale: f64,
        head_rows: usize,
        sink: &mut LinearSink<'_>,
    ) -> Result<f64> {
        let Ok(kept) = kept.downcast::<Kept>() else {
            bail!("internal error: a kept forward of another model was passed to the whole-model backward");
        };
        let _total = Finally(&self.total_secs, std::time::Instant::now());
        let Kept { fw, batch } = *kept;
        let labels = self.vl.labels(&batch.input_ids, b.pad_token_id);
        let names = self.text().linear_names();
        // The head's chunks come first, then the decoder layers: never both at once.
        let shared = std::cell::RefCell::new(&mut *sink);
        let (loss, visual) = self.text().backward_ce(
            fw,
            &labels,
            Some(b.pad_token_id),
            loss_scale,
            head_rows,
            Some(&mut |x: &Tensor, y: &Tensor, dy: &Tensor| (shared.borrow_mut())(HEAD, x, y, dy)),
            &mut |idx, x, y, dy| (shared.borrow_mut())(&format!("{LM_PREFIX}{}", names[idx]), x, y, dy),
        )?;
        let visual = visual.context("internal error: a batch with images gave no visual gradients")?;
        let images = self.images(b)?;
        let vnames = self.vl.vision.linear_names();
        let t0 = std::time::Instant::now();
        let _tower = Finally(&self.tower_secs, t0);
        for (i, rows) in self.image_rows(&images).into_iter().enumerate() {
            let one = images.select(i..i + 1)?;
            let (_, cache) = self.vl.vision.forward_for_backward(&one, &mut NoTap)?;
            let d_embeds = visual.embeds.narrow(0, rows.start, rows.len())?;
            let d_ds: Vec<Tensor> = visual
                .deepstack
                .iter()
                .map(|g| g.narrow(0, rows.start, rows.len()))
                .collect::<candle_core::Result<_>>()?;
            self.vl.vision.backward(cache, &d_embeds, &d_ds, &mut |idx, x, y, dy| sink(&vnames[idx], x, y, dy))?;
        }
        Ok(loss)
    }

    fn forward_resumable(&self, b: &Batch) -> Result<(Tensor, KeptForward)> {
        let _total = Finally(&self.total_secs, std::time::Instant::now());
        let images = self.images(b)?;
        let t0 = std::time::Instant::now();
        let out = self.vl.vision.forward(&images, &mut NoTap)?;
        add_time(&self.tower_secs, t0);
        let batch = self.lm_batch(b, &images, &out)?;
        let (hidden, layer_inputs) = self.text().hidden_and_layer_inputs(&batch, &mut NoTap)?;
        Ok((hidden.clone(), Box::new(Resumable { batch, layer_inputs, hidden })))
    }

    /// A tower override reruns the tower with it and then the whole language model; a
    /// language-model override resumes at its first decoder layer; the head's override
    /// leaves the hidden states as they are (see [`Self::head_logits_with`]).
    fn hidden_resumed(
        &self,
        b: &Batch,
        kept: &KeptForward,
        overrides: &HashMap<String, LinearOverride<'_>>,
    ) -> Result<Tensor> {
        let Some(r) = kept.downcast_ref::<Resumable>() else {
            bail!("internal error: a kept forward of another kind was passed to the whole-model resumed forward");
        };
        let _total = Finally(&self.total_secs, std::time::Instant::now());
        let t = self.text();
        let tower = overrides.keys().any(|n| n != HEAD && !n.starts_with(LM_PREFIX));
        let mut lm_tap = override_tap(t.linear_names(), LM_PREFIX, overrides);
        if tower {
            let images = self.images(b)?;
            let mut vtap = override_tap(self.vl.vision.linear_names(), "", overrides);
            let t0 = std::time::Instant::now();
            let out = self.vl.vision.forward(&images, &mut vtap)?;
            add_time(&self.tower_secs, t0);
            let batch = self.lm_batch(b, &images, &out)?;
            return t.forward_no_head(&batch, &mut lm_tap);
        }
        let mut first = usize::MAX;
        for name in overrides.keys().filter(|n| *n != HEAD) {
            let lm = name.strip_prefix(LM_PREFIX).unwrap_or(name);
            let idx = t.linear_index(lm).with_context(|| format!("the model has no linear `{name}`"))?;
            first = first.min(idx / model::LINEARS_PER_LAYER);
        }
        if first == usize::MAX {
            return Ok(r.hidden.clone());
        }
        let first = first.min(r.layer_inputs.len().saturating_sub(1));
        t.hidden_from(&r.batch, first, &r.layer_inputs[first], &mut lm_tap)
    }

    fn head_logits(&self, hidden: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
        self.text().head_logits(hidden, rows)
    }

    fn head_logits_with(
        &self,
        hidden: &Tensor,
        rows: std::ops::Range<usize>,
        overrides: &HashMap<String, LinearOverride<'_>>,
    ) -> Result<Tensor> {
        let Some(o) = overrides.get(HEAD) else { return self.head_logits(hidden, rows) };
        let h = hidden.narrow(0, rows.start, rows.len())?;
        let hq = match o.input {
            Some(f) => f(&h)?,
            None => h,
        };
        model::matmul_xwt(&hq.to_dtype(o.weight.dtype())?, &o.weight)
    }

    fn vocab_size(&self) -> usize {
        self.text().config().vocab_size
    }

    fn report(&self) -> Option<String> {
        let (tower, total) = (self.tower_secs.get(), self.total_secs.get());
        (total > 0.0).then(|| {
            format!(
                "the vision tower (its forwards, backward and Linears' scores) took {tower:.1} s of the model's \
                 {total:.1} s ({:.0} %)",
                100.0 * tower / total
            )
        })
    }
}

/// Adds the time since `.1` to `.0` when dropped (on every return path).
struct Finally<'a>(&'a std::cell::Cell<f64>, std::time::Instant);

impl Drop for Finally<'_> {
    fn drop(&mut self) {
        add_time(self.0, self.1);
    }
}
