//! Glue between the scorer and the modules other parts of qpipe own: the checkpoint
//! locator, the calibration `.pt` reader, the language model, the fake-quant formats and
//! the torch `.pt` writer. Kept here so the scorer itself depends only on [`super::backend`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::backend::{Batch, ForwardSink, GradSink, InputSink, LinearOverride, ScoreFormat, ScoreModel};
use super::recipes::LinearInfo;
use super::FormatParams;
use crate::contract::Job;
use crate::model::{self, TextModel};

/// The checkpoint folder of a job, from its `checkpoint` locator (local or hub cache).
pub fn checkpoint_dir(job: &Job<'_>) -> Result<PathBuf> {
    let loc = job.locators.get("checkpoint").context("`score` job has no `checkpoint` locator")?;
    crate::checkpoint::resolve_dir(job.root, loc)
}

/// The language model behind the scorer: the candle Qwen3-VL text model, f32 on the CPU.
pub fn load_model(dir: &Path) -> Result<Box<dyn ScoreModel>> {
    let m = TextModel::load(dir).with_context(|| format!("loading the language model of {}", dir.display()))?;
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

    fn weight(&self, name: &str) -> Result<Tensor> {
        let w = self.linear_weight_by_name(name).with_context(|| format!("the model has no linear `{name}`"))?;
        Ok(w.to_dtype(DType::F32)?)
    }

    fn forward_inputs(&self, batch: &Batch, sink: &mut InputSink<'_>) -> Result<()> {
        let mut tap = |_: usize, name: &str, x: &Tensor, _: &Tensor, _: &Tensor| -> Result<Option<Tensor>> {
            sink(name, x)?;
            Ok(None)
        };
        self.forward(&model_batch(batch)?, &mut tap)?;
        Ok(())
    }

    fn forward_backward(
        &self,
        batch: &Batch,
        on_forward: &mut ForwardSink<'_>,
        on_grad: &mut GradSink<'_>,
    ) -> Result<f64> {
        let mb = model_batch(batch)?;
        let mut tap = |_: usize, name: &str, x: &Tensor, _: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
            if !y.sum_all()?.to_scalar::<f32>()?.is_finite() {
                bail!("the output of linear `{name}` contains NaN or Inf");
            }
            on_forward(name, x, y)?;
            Ok(None)
        };
        let lg = self.linear_output_grads(&mb, Some(batch.pad_token_id), &mut tap)?;
        for (name, g) in self.linear_names().iter().zip(&lg.grads) {
            on_grad(name, g)?;
        }
        Ok(f64::from(lg.loss))
    }

    fn logits(&self, batch: &Batch, overrides: &HashMap<String, LinearOverride<'_>>) -> Result<Tensor> {
        let mut tap = |_: usize, name: &str, x: &Tensor, _: &Tensor, _: &Tensor| -> Result<Option<Tensor>> {
            let Some(o) = overrides.get(name) else { return Ok(None) };
            let xq = match o.input {
                Some(f) => f(x)?,
                None => x.clone(),
            };
            Ok(Some(xq.matmul(&o.weight.t()?)?))
        };
        self.forward(&model_batch(batch)?, &mut tap)
    }
}

/// The fake-quant format of a run.
pub fn load_format(p: &FormatParams) -> Result<Box<dyn ScoreFormat>> {
    bail!("format `{}`: the fake-quant formats are not merged into `score` yet", p.name)
}

/// Calibration batches from the build-calib `.pt`.
pub fn load_batches(path: &Path, batch_size: usize) -> Result<Vec<Batch>> {
    let _ = batch_size;
    bail!("reading {}: the calibration reader is not merged into `score` yet", path.display())
}

/// The state tree as a torch-loadable `.pt` (the same dict `json.load` of the JSON gives).
pub fn write_state_pt(path: &Path, state: &Value) -> Result<()> {
    crate::torch_pt::write(path, &crate::torch_pt::Value::from(state))
        .with_context(|| format!("writing the AutoQuant state {}", path.display()))
}
