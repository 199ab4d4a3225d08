//! qpipe's whole-model scorer (`autoquant.coverage=full`: the vision tower, the language
//! model and `lm_head`) against ModelOpt `auto_quantize` on the whole transformers model
//! with image-text batches (`stages/tests/fixtures/oracle_modelopt_vl.json` and
//! `…_vl_f64.json`, written by `scripts/modelopt_oracle_vl.py` from the committed tiny
//! checkpoint and `data/coco/`).
//!
//! The images go through qpipe's own preprocessing (checked here against the oracle's
//! pixel checksums), the tokens are the oracle's. Per case: every group present in
//! ModelOpt's order, costs equal, Spearman ρ ≥ 0.999, and each score within 1e-3 relative
//! of ModelOpt's f32 score — or no further from ModelOpt's f64 score than ModelOpt's own
//! f32 score is (16 short samples: ModelOpt f32 itself sits up to 1.2e-3 from f64 here).
//! In f64 against the float64 run: every score within 1e-6.

use candle_core::{DType, Device, Tensor};
use qpipe_contract::Silent;
use qpipe_stages::io::image;
use qpipe_stages::score::backend::{Batch, RowImage};
use qpipe_stages::score::{self, whole_model, FormatParams, Method, Settings};
use serde_json::Value;

mod common;
use common::root;

const REL_TOL: f64 = 1e-3;
const REL_TOL_F64: f64 = 1e-6;
const MIN_SPEARMAN: f64 = 0.999;

/// The oracle's batches with qpipe's preprocessing of its images.
fn batches(doc: &Value) -> Vec<Batch> {
    let ckpt = root().join(doc["checkpoint"].as_str().unwrap());
    let cfg = image::ImageProcessorConfig::from_file(&ckpt.join("preprocessor_config.json")).unwrap();
    let coco_dir = root().join(doc["coco"].as_str().unwrap()).parent().unwrap().to_path_buf();
    let pad = doc["pad_token_id"].as_u64().unwrap() as u32;
    let config: Value = serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).unwrap()).unwrap();
    let vision: Vec<u32> = ["image_token_id", "vision_start_token_id", "vision_end_token_id"]
        .iter()
        .map(|k| config[k].as_u64().unwrap() as u32)
        .collect();
    let mut rows = Vec::new();
    for s in doc["samples"].as_array().unwrap() {
        let img = image::load(&coco_dir.join(s["image"].as_str().unwrap()), &cfg).unwrap();
        let p = image::preprocess(&img, &cfg).unwrap();
        let grid: Vec<usize> = serde_json::from_value(s["image_grid_thw"].clone()).unwrap();
        assert_eq!(p.grid_thw.to_vec(), grid, "{}: grid", s["image"]);
        let c = &s["pixel_values"];
        let (mut sum, mut sq, mut weighted) = (0f64, 0f64, 0f64);
        for (k, &v) in p.pixel_values.iter().enumerate() {
            let v = f64::from(v);
            sum += v;
            sq += v * v;
            weighted += ((k % 61) + 1) as f64 * v;
        }
        for (mine, key) in [(sum, "sum"), (sq, "sum_sq"), (weighted, "weighted_sum")] {
            let theirs = c[key].as_f64().unwrap();
            assert!(
                (mine - theirs).abs() <= 1e-9 * theirs.abs().max(1.0),
                "{}: pixel {key} {mine} vs {theirs}",
                s["image"]
            );
        }
        let ids: Vec<u32> = serde_json::from_value(s["input_ids"].clone()).unwrap();
        let mask: Vec<u32> = serde_json::from_value(s["attention_mask"].clone()).unwrap();
        let pixel_values = Tensor::from_slice(&p.pixel_values, (p.num_patches(), p.patch_dim()), &Device::Cpu).unwrap();
        rows.push((ids, mask, RowImage { pixel_values, grid_thw: p.grid_thw }));
    }
    let bs = doc["batch_size"].as_u64().unwrap() as usize;
    rows.chunks(bs)
        .map(|c| Batch {
            input_ids: c.iter().map(|r| r.0.clone()).collect(),
            attention_mask: c.iter().map(|r| r.1.clone()).collect(),
            pad_token_id: pad,
            ignored_token_ids: vision.clone(),
            images: c.iter().map(|r| r.2.clone()).collect(),
        })
        .collect()
}

fn check_case(dtype: DType, case: &str, format_name: &str) {
    let f64_mode = dtype == DType::F64;
    let doc = common::fixture(if f64_mode { "oracle_modelopt_vl_f64.json" } else { "oracle_modelopt_vl.json" });
    let exact = common::fixture("oracle_modelopt_vl_f64.json");
    let c = &doc["cases"][case];
    let batches = batches(&doc);
    let settings = Settings {
        method: Method::parse(c["method"].as_str().unwrap()).unwrap(),
        batch_size: doc["batch_size"].as_u64().unwrap() as usize,
        score_size: doc["score_size"].as_u64().unwrap() as usize,
        device: "cpu".into(),
        memory_limit: None,
    };
    let model = whole_model::load(&root().join(doc["checkpoint"].as_str().unwrap()), dtype, &Device::Cpu).unwrap();
    let format = score::adapters::load_format(&FormatParams {
        name: format_name.into(),
        granularity: None,
        quant_cfg_overrides: Value::Object(Default::default()),
    })
    .unwrap();
    let scores = score::run_scoring(&model, format.as_ref(), &batches, &settings, &Silent).unwrap();
    let ours = qpipe_stages::search::complete(&scores, settings.method, c["effective_bits"].as_f64().unwrap()).unwrap();
    assert_eq!(ours["num_calib_steps"], doc["num_calib_steps"]);
    assert_eq!(ours["num_score_steps"], doc["num_score_steps"]);
    let mut amax_worst: f64 = 0.0;
    for (linear, a) in c["input_amax"].as_object().unwrap() {
        let theirs = a.as_f64().unwrap();
        let mine = f64::from(format.input_amax(linear).unwrap_or_else(|| panic!("{case}: `{linear}` not calibrated")));
        amax_worst = amax_worst.max((mine - theirs).abs() / theirs);
    }
    assert!(amax_worst <= 1e-5, "{case}: calibrated input ranges differ from ModelOpt's by {amax_worst:.2e}");

    let theirs = c["candidate_stats"].as_object().unwrap();
    let mine = ours["candidate_stats"].as_object().unwrap();
    assert_eq!(theirs.keys().collect::<Vec<_>>(), mine.keys().collect::<Vec<_>>(), "{case}: recipe names/order");
    let reference = exact["cases"][case]["candidate_stats"].as_object().unwrap();
    let (mut a, mut b) = (vec![], vec![]);
    let (mut worst, mut worst_f64, mut their_f64): (f64, f64, f64) = (0.0, 0.0, 0.0);
    let mut failed = Vec::new();
    let mut table = format!(
        "{case} ({dtype:?})\n{:<58} {:>13} {:>13} {:>9} {:>9}\n",
        "recipe", "modelopt", "qpipe", "rel", "f64: ours/theirs"
    );
    for (name, t) in theirs {
        let m = &mine[name];
        assert_eq!(m["costs"], t["costs"], "{case} {name}: costs");
        assert_eq!(m["formats"], t["formats"], "{case} {name}: formats");
        let (ts, ms) = (t["scores"][0].as_f64().unwrap(), m["scores"][0].as_f64().unwrap());
        let ex = reference[name]["scores"][0].as_f64().unwrap();
        let rel = (ms - ts).abs() / ts.abs().max(1e-300);
        let (ours_f64, theirs_f64) = ((ms - ex).abs() / ex.abs(), (ts - ex).abs() / ex.abs());
        worst = worst.max(rel);
        worst_f64 = worst_f64.max(ours_f64);
        their_f64 = their_f64.max(theirs_f64);
        let ok = if f64_mode { rel <= REL_TOL_F64 } else { rel <= REL_TOL || ours_f64 <= theirs_f64 };
        if !ok {
            failed.push(name.clone());
        }
        table += &format!("{name:<58} {ts:>13.6e} {ms:>13.6e} {rel:>9.2e} {ours_f64:>9.2e}/{theirs_f64:.2e}\n");
        a.push(ts);
        b.push(ms);
    }
    let rho = qpipe_stages::stats::spearman(&a, &b).unwrap();
    eprintln!(
        "{table}worst rel {worst:.3e}; vs ModelOpt f64: qpipe {worst_f64:.3e}, ModelOpt f32 {their_f64:.3e}; spearman {rho:.6}"
    );
    assert!(failed.is_empty(), "{case} ({dtype:?}): out of tolerance: {failed:?}\n{table}");
    assert!(rho >= MIN_SPEARMAN, "{case}: spearman {rho}");
    let groups = theirs.len();
    let tower = theirs.keys().filter(|k| k.starts_with("model.visual.")).count();
    assert!(tower > 0 && theirs.contains_key("lm_head.quant_recipe"), "{case}: {groups} groups, {tower} in the tower");
}

#[test]
fn int8_default_gradient_matches_modelopt_on_the_whole_model() {
    check_case(DType::F32, "int8_default_gradient", "INT8_DEFAULT_CFG");
}

#[test]
fn fp8_default_gradient_matches_modelopt_on_the_whole_model() {
    check_case(DType::F32, "fp8_default_gradient", "FP8_DEFAULT_CFG");
}

#[test]
fn int8_weight_only_kl_div_matches_modelopt_on_the_whole_model() {
    check_case(DType::F32, "int8_weight_only_kl_div", "INT8_WEIGHT_ONLY_CFG");
}

#[test]
fn f64_whole_model_scores_match_modelopt_in_float64() {
    check_case(DType::F64, "int8_default_gradient", "INT8_DEFAULT_CFG");
    check_case(DType::F64, "fp8_default_gradient", "FP8_DEFAULT_CFG");
    check_case(DType::F64, "int8_weight_only_kl_div", "INT8_WEIGHT_ONLY_CFG");
}
