//! The gradient scorer's memory plan on the fixture model: within a limit that does not
//! hold a whole batch, a batch is
//! scored in slices of its rows, each slice's loss gradient scaled to the whole batch's
//! mean, with the same scores to rounding; a limit that cannot hold one row is refused
//! with the numbers.

mod common;
use common::{oracle_batches, root};

use std::sync::Mutex;

use qpipe_contract::Progress;
use qpipe_stages::score::backend::{Batch, ScoreFormat, ScoreModel};
use qpipe_stages::score::{self, adapters, memory, scorer, FormatParams, Method, Settings};
use serde_json::Value;

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

fn model() -> Box<dyn ScoreModel> {
    adapters::load_model(&root().join("models/tiny_qwen3_vl/checkpoint")).unwrap()
}

fn format(name: &str) -> Box<dyn ScoreFormat> {
    let params =
        FormatParams { name: name.into(), granularity: None, quant_cfg_overrides: Value::Object(Default::default()) };
    adapters::load_format(&params).unwrap()
}

fn batches() -> Vec<Batch> {
    let (batches, batch_size) = oracle_batches(&common::fixture("oracle_modelopt.json"));
    assert_eq!(batch_size, 8);
    batches
}

/// Scores of every recipe, and the notes the scorer printed.
fn run(name: &str, limit: Option<u64>) -> anyhow::Result<(Vec<f64>, Vec<String>)> {
    let settings =
        Settings { method: Method::Gradient, batch_size: 8, score_size: 64, device: "cpu".into(), memory_limit: limit };
    let notes = Notes::default();
    let state = score::run_scoring(model().as_ref(), format(name).as_ref(), &batches(), &settings, &notes)?;
    let scores = state["candidate_stats"].as_object().unwrap().values().map(|s| s["scores"][0].as_f64().unwrap());
    Ok((scores.collect(), notes.0.into_inner().unwrap()))
}

/// The largest limit (searched down from a roomy one in steps of 256 bytes) whose plan
/// for `name` satisfies `want`.
fn limit_where(name: &str, want: impl Fn(&memory::Plan) -> bool) -> u64 {
    let (m, f, b) = (model(), format(name), batches());
    let plan = |limit| scorer::gradient_plan(m.as_ref(), &[f.as_ref()], &b, Some(limit));
    let roomy = plan(1 << 40).unwrap();
    let mut limit = roomy.weights + roomy.checkpoints + roomy.layer.max(roomy.head);
    while limit > 1 << 10 {
        if let Ok(p) = plan(limit) {
            if want(&p) {
                return limit;
            }
        }
        limit -= 256;
    }
    panic!("no limit gives the plan wanted");
}

#[test]
fn a_roomy_limit_scores_whole_batches_with_one_head_chunk() {
    // (Chunked heads give the same bits: the model's
    // `a_checkpointed_backward_with_a_chunked_head_gives_the_kept_backward_bits`.)
    let (_, notes) = run("INT8_DEFAULT_CFG", Some(1 << 40)).unwrap();
    let plan = notes.iter().find(|n| n.contains("memory plan")).unwrap();
    assert!(plan.contains("head in chunks of 512 positions") && !plan.contains("slices"), "{plan}");
}

#[test]
fn a_batch_too_large_for_the_limit_is_scored_in_slices_with_the_same_scores() {
    for name in ["INT8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG"] {
        let (whole, _) = run(name, None).unwrap();
        let limit = limit_where(name, |p| p.rows == 3);
        let (sliced, notes) = run(name, Some(limit)).unwrap();
        assert!(notes.iter().any(|n| n.contains("in slices of 3 of their 8 rows")), "{notes:?}");
        let worst = whole.iter().zip(&sliced).map(|(a, b)| (a - b).abs() / a.abs()).fold(0.0, f64::max);
        eprintln!("{name}: worst relative difference, sliced vs whole: {worst:.2e}");
        assert!(worst < 1e-5, "{name}: slicing changed scores by {worst:.2e}");
    }
}

#[test]
fn a_limit_that_cannot_hold_one_row_is_refused_with_the_numbers() {
    let m = model();
    let e = run("INT8_WEIGHT_ONLY_CFG", Some(m.weight_bytes() + 1000)).unwrap_err();
    assert!(format!("{e:#}").contains("one row of a batch needs"), "{e:#}");
    assert!(format!("{e:#}").contains("autoquant.memory_limit"), "{e:#}");
    // Dynamic input ranges: slicing would change them, so the whole batch must fit.
    let limit = limit_where("INT8_WEIGHT_ONLY_CFG", |p| p.rows == 3);
    let e = run("FP8_PER_CHANNEL_PER_TOKEN_CFG", Some(limit)).unwrap_err();
    assert!(format!("{e:#}").contains("cannot be sliced"), "{e:#}");
    // The weights alone.
    let ckpt = root().join("models/tiny_qwen3_vl/checkpoint");
    let e = score::check_weights_fit(&ckpt, candle_core::DType::F32, "cpu", Some(1000)).unwrap_err();
    assert!(e.to_string().contains("memory limit is"), "{e}");
}
