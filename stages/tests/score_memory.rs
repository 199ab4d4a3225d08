//! The gradient scorer's memory plan: a batch whose forward-for-backward does not fit in
//! the memory the device reports is scored in slices of its rows, with each slice's loss
//! gradient scaled to the whole batch's mean, and gives the same scores.

mod common;
use common::{oracle_batches, root};

use candle_core::Tensor;
use std::sync::Mutex;

use qpipe_contract::Progress;
use qpipe_stages::score::backend::{Batch, InputSink, KeptForward, LinearOverride, LinearSink, ScoreModel};
use qpipe_stages::score::recipes::LinearInfo;
use qpipe_stages::score::{self, adapters, FormatParams, Method, Settings};
use serde_json::Value;

/// The fixture model, reporting `available` bytes free.
struct Tight {
    inner: Box<dyn ScoreModel>,
    available: Option<u64>,
}

impl ScoreModel for Tight {
    fn linears(&self) -> Vec<LinearInfo> {
        self.inner.linears()
    }
    fn weight(&self, name: &str) -> anyhow::Result<Tensor> {
        self.inner.weight(name)
    }
    fn dtype_name(&self) -> &'static str {
        self.inner.dtype_name()
    }
    fn available_memory(&self) -> Option<u64> {
        self.available
    }
    fn forward_inputs(&self, b: &Batch, sink: &mut InputSink<'_>) -> anyhow::Result<()> {
        self.inner.forward_inputs(b, sink)
    }
    fn forward_keep(&self, b: &Batch, sink: &mut InputSink<'_>) -> anyhow::Result<KeptForward> {
        self.inner.forward_keep(b, sink)
    }
    fn kept_bytes(&self, b: &Batch) -> u64 {
        self.inner.kept_bytes(b)
    }
    fn backward_linears(
        &self,
        b: &Batch,
        k: KeptForward,
        scale: f64,
        sink: &mut LinearSink<'_>,
    ) -> anyhow::Result<f64> {
        self.inner.backward_linears(b, k, scale, sink)
    }
    fn forward_resumable(&self, b: &Batch) -> anyhow::Result<(Tensor, KeptForward)> {
        self.inner.forward_resumable(b)
    }
    fn logits_resumed(
        &self,
        b: &Batch,
        k: &KeptForward,
        o: &std::collections::HashMap<String, LinearOverride<'_>>,
    ) -> anyhow::Result<Tensor> {
        self.inner.logits_resumed(b, k, o)
    }
}

/// Keeps the stage's notes.
#[derive(Default)]
struct Notes(Mutex<Vec<String>>);

impl Progress for Notes {
    fn phase(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn note(&self, msg: &str) {
        self.0.lock().unwrap().push(msg.to_string());
    }
}

/// Scores of every recipe, and the notes the scorer printed.
fn run(format: &str, available: Option<u64>) -> anyhow::Result<(Vec<f64>, Vec<String>)> {
    let (batches, batch_size) = oracle_batches(&common::fixture("oracle_modelopt.json"));
    assert_eq!(batch_size, 8);
    let root = root();
    let settings = Settings { method: Method::Gradient, batch_size: 8, score_size: 64, device: "cpu".into() };
    let model = Tight { inner: adapters::load_model(&root.join("models/tiny_qwen3_vl/checkpoint"))?, available };
    let params =
        FormatParams { name: format.into(), granularity: None, quant_cfg_overrides: Value::Object(Default::default()) };
    let fmt = adapters::load_format(&params)?;
    let notes = Notes::default();
    let state = score::run_scoring(&model, fmt.as_ref(), &batches, &settings, &notes)?;
    let scores = state["candidate_stats"].as_object().unwrap().values().map(|s| s["scores"][0].as_f64().unwrap());
    Ok((scores.collect(), notes.0.into_inner().unwrap()))
}

/// Bytes of the fixture model's forward-for-backward for `rows` rows of 64 tokens.
fn kept(rows: usize) -> u64 {
    let m = adapters::load_model(&root().join("models/tiny_qwen3_vl/checkpoint")).unwrap();
    m.kept_bytes(&Batch {
        input_ids: vec![vec![1; 64]; rows],
        attention_mask: vec![vec![1; 64]; rows],
        pad_token_id: 0,
    })
}

#[test]
fn a_batch_too_large_for_memory_is_scored_in_slices_with_the_same_scores() {
    let tight = kept(3) + kept(3) / 10; // three rows fit, four do not: slices of 3, 3, 2
    for format in ["INT8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG"] {
        let (whole, notes) = run(format, None).unwrap();
        assert!(!notes.iter().any(|n| n.contains("slices")), "{notes:?}");
        let (sliced, notes) = run(format, Some(tight)).unwrap();
        assert!(notes.iter().any(|n| n.contains("in slices of 3 of its 8 rows")), "{notes:?}");
        let worst = whole.iter().zip(&sliced).map(|(a, b)| (a - b).abs() / a.abs()).fold(0.0, f64::max);
        eprintln!("{format}: worst relative difference, sliced vs whole: {worst:.2e}");
        assert!(worst < 1e-5, "{format}: slicing changed scores by {worst:.2e}");
    }
}

#[test]
fn a_batch_that_cannot_be_sliced_or_fit_is_refused_with_the_numbers() {
    // Not even one row fits.
    let e = run("INT8_WEIGHT_ONLY_CFG", Some(kept(1) / 2)).unwrap_err();
    assert!(format!("{e:#}").contains("lower `autoquant.batch_size`"), "{e:#}");
    // Dynamic input ranges: slicing would change them, so no slicing.
    let e = run("FP8_PER_CHANNEL_PER_TOKEN_CFG", Some(kept(3))).unwrap_err();
    assert!(format!("{e:#}").contains("GiB of memory is available"), "{e:#}");
}
