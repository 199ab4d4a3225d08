//! The whole Qwen3-VL model for batches with images: the vision tower ([`crate::vision`])
//! feeding the language model ([`crate::TextModel`]) as transformers'
//! `Qwen3VLModel.forward` does — the tower's embeddings replace the image tokens', its
//! DeepStack features join the residual stream after the first decoder layers, and every
//! token gets its 3-D M-RoPE position ([`crate::rope_index`]).
//!
//! Gradients flow the other way: the language model's backward hands out dL/d(embeddings)
//! and dL/d(DeepStack features) at the image positions ([`crate::VisualGrads`]), and the
//! tower's backward turns them into dL/dy of each of its Linears
//! ([`VlModel::linear_output_grads`] does both for one batch).

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::vision::{Images, VisionConfig, VisionModel, VisionOutput};
use crate::{rope_index, Batch, LinearTap, TextModel, VisualTokens};

/// The language model and the vision tower of one checkpoint.
pub struct VlModel {
    pub text: TextModel,
    pub vision: VisionModel,
}

/// Loss and dL/dy of every Linear of one batch with images.
pub struct VlGrads {
    pub loss: f64,
    /// Per language-model Linear (module order), `[N, out]`.
    pub text: Vec<Tensor>,
    /// Per tower Linear (module order), `[rows, out]`.
    pub vision: Vec<Tensor>,
    /// dL/dlogits `[N, V]` (`lm_head`'s output gradient).
    pub head: Tensor,
}

impl VlModel {
    /// Loads both parts of the checkpoint in `dir`; an error when it has no vision tower.
    pub fn load_with(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = VisionConfig::from_dir(dir)?.with_context(|| {
            format!("{}/config.json has no `vision_config`: this checkpoint has no vision tower", dir.display())
        })?;
        let text = TextModel::load_with(dir, dtype, device)?;
        ensure!(
            cfg.out_hidden_size == text.config().hidden_size,
            "vision_config.out_hidden_size {} != the language model's hidden_size {}",
            cfg.out_hidden_size,
            text.config().hidden_size
        );
        let vision = VisionModel::load_with(dir, cfg, dtype, device)?;
        Ok(VlModel { text, vision })
    }

    /// The flat rows `b·T + t` of the image tokens of `input_ids`, in order.
    pub fn image_rows(&self, input_ids: &[Vec<u32>]) -> Vec<u32> {
        let id = self.vision.config().image_token_id;
        let t = input_ids.first().map_or(0, Vec::len);
        let mut rows = Vec::new();
        for (bi, row) in input_ids.iter().enumerate() {
            rows.extend(row.iter().enumerate().filter(|(_, &x)| x == id).map(|(ti, _)| (bi * t + ti) as u32));
        }
        rows
    }

    /// `batch` with the tower's output `out` for `images` (one image per run of image
    /// tokens, in batch order).
    pub fn with_images(&self, batch: Batch, images: &Images, out: &VisionOutput) -> Result<Batch> {
        let rows = self.image_rows(&batch.input_ids);
        ensure!(
            rows.len() == out.embeds.dim(0)?,
            "the batch has {} image tokens, the images make {} (image tokens and images do not match)",
            rows.len(),
            out.embeds.dim(0)?
        );
        let c = self.vision.config();
        let positions = rope_index(
            &batch.input_ids,
            &batch.attention_mask,
            &images.grid_thw,
            c.image_token_id,
            c.spatial_merge_size,
        )?;
        batch.with_visual(VisualTokens {
            rows,
            embeds: out.embeds.clone(),
            deepstack: out.deepstack.clone(),
            positions,
        })
    }

    /// Logits `[B, T, V]` of a batch with images; `tap` sees the tower's Linears, then the
    /// language model's.
    pub fn forward(&self, batch: Batch, images: &Images, tap: &mut dyn LinearTap) -> Result<Tensor> {
        let out = self.vision.forward(images, tap)?;
        let batch = self.with_images(batch, images, &out)?;
        self.text.forward(&batch, tap)
    }

    /// Labels for the loss: the input ids with the vision tokens replaced by `ignore` (so
    /// that, with `ignore_index = ignore`, pads and vision tokens are not predicted).
    pub fn labels(&self, input_ids: &[Vec<u32>], ignore: u32) -> Vec<Vec<u32>> {
        let c = self.vision.config();
        let vision = [c.image_token_id, c.vision_start_token_id, c.vision_end_token_id];
        input_ids.iter().map(|r| r.iter().map(|&x| if vision.contains(&x) { ignore } else { x }).collect()).collect()
    }

    /// Forward, mean shifted cross-entropy (pads, `<|vision_start|>`, `<|image_pad|>` and
    /// `<|vision_end|>` ignored; `pad_id` is the pad token), backward through both parts.
    pub fn linear_output_grads(&self, batch: Batch, images: &Images, pad_id: u32) -> Result<VlGrads> {
        let (out, cache) = self.vision.forward_for_backward(images, &mut crate::NoTap)?;
        let labels = self.labels(&batch.input_ids, pad_id);
        let batch = self.with_images(batch, images, &out)?;
        let fw = self.text.forward_for_backward(&batch, &mut crate::NoTap)?;
        let mut text: Vec<Option<Tensor>> = vec![None; self.text.num_linears()];
        let mut head = Vec::new();
        let (b, t) = batch.dims();
        let (loss, visual) = self.text.backward_ce(
            fw,
            &labels,
            Some(pad_id),
            1.0,
            b * t,
            Some(&mut |_, _, dy: &Tensor| {
                head.push(dy.clone());
                Ok(())
            }),
            &mut |idx, _, _, dy| {
                text[idx] = Some(dy.clone());
                Ok(())
            },
        )?;
        let visual = visual.context("internal error: a batch with images gave no visual gradients")?;
        let mut vision: Vec<Option<Tensor>> = vec![None; self.vision.linear_names().len()];
        self.vision.backward(cache, &visual.embeds, &visual.deepstack, &mut |idx, _, _, dy| {
            vision[idx] = Some(dy.clone());
            Ok(())
        })?;
        Ok(VlGrads {
            loss,
            text: text.into_iter().map(|g| g.context("a Linear got no gradient")).collect::<Result<_>>()?,
            vision: vision.into_iter().map(|g| g.context("a tower Linear got no gradient")).collect::<Result<_>>()?,
            head: Tensor::cat(&head, 0)?,
        })
    }
}

#[cfg(test)]
mod tests;
