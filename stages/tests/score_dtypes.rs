//! The scorer in bf16 — the precision `autoquant.dtype=auto` picks on a GPU — against f32
//! on the ModelOpt oracle's checkpoint and tokens, on the CPU (the same candle ops the GPU
//! runs, in the same dtype; fake quantization is f32 on both). bf16 keeps 8 bits of
//! mantissa; the ranking must hold (Spearman ρ ≥ 0.99) and every recipe's score stay
//! within [`REL_TOL`] of f32. Measured on this fixture: INT8 weight-only worst 0.4 %
//! (ρ = 1.0), FP8_DEFAULT 7 % (ρ = 0.997), INT8_DEFAULT 12 % (ρ = 0.994). Formats that
//! quantize activations differ most: a bf16 model's activations are themselves on a grid
//! only a few times finer than an 8-bit one, so their quantization error is not the f32
//! model's (on a real bf16 deployment it is the bf16 one that is right).

use candle_core::DType;
use qpipe_contract::Silent;
use qpipe_stages::score::{self, adapters, FormatParams, Method, Settings};
use serde_json::Value;

/// Worst relative difference of a recipe score, bf16 against f32 (measured ≤ 0.12).
const REL_TOL: f64 = 0.15;
const MIN_SPEARMAN: f64 = 0.99;

mod common;
use common::{oracle_batches, root};

/// The fixture checkpoint with its weights rounded to bf16, as real checkpoints ship (the
/// fixture's are f32): both runs then see the same weights, as they do on real models.
fn bf16_checkpoint() -> tempfile::TempDir {
    let src = root().join("models/tiny_qwen3_vl/checkpoint");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let dst = dir.path().join(path.file_name().unwrap());
        if path.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
            let rounded: std::collections::HashMap<String, candle_core::Tensor> =
                tensors.into_iter().map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap())).collect();
            candle_core::safetensors::save(&rounded, &dst).unwrap();
        } else if path.is_file() {
            std::fs::copy(&path, &dst).unwrap();
        }
    }
    dir
}

fn scores(ckpt: &std::path::Path, dtype: DType, device: &candle_core::Device, format: &str) -> Vec<(String, f64)> {
    let doc = common::fixture("oracle_modelopt.json");
    let (batches, batch_size) = oracle_batches(&doc);
    let settings = Settings {
        method: Method::Gradient,
        batch_size,
        score_size: doc["score_size"].as_u64().unwrap() as usize,
        device: if device.is_cpu() { "cpu".into() } else { "cuda:0".into() },
        memory_limit: None,
    };
    assert_eq!(doc["checkpoint"], "models/tiny_qwen3_vl/checkpoint");
    let model = adapters::load_model_on(ckpt, dtype, device).unwrap();
    let params =
        FormatParams { name: format.into(), granularity: None, quant_cfg_overrides: Value::Object(Default::default()) };
    let fmt = adapters::load_format(&params).unwrap();
    let state = score::run_scoring(model.as_ref(), fmt.as_ref(), &batches, &settings, &Silent).unwrap();
    assert_eq!(state["dtype"], if dtype == DType::F32 { "f32" } else { "bf16" });
    state["candidate_stats"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, s)| (name.clone(), s["scores"][0].as_f64().unwrap()))
        .collect()
}

#[test]
fn bf16_scores_rank_as_f32_scores() {
    let ckpt = bf16_checkpoint();
    let cpu = candle_core::Device::Cpu;
    for format in ["INT8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG"] {
        let (a, b) = (scores(ckpt.path(), DType::F32, &cpu, format), scores(ckpt.path(), DType::BF16, &cpu, format));
        compare(format, &a, &b, REL_TOL, MIN_SPEARMAN);
    }
}

/// Asserts `b` agrees with `a` (per-recipe relative difference, Spearman ρ of the ranking).
fn compare(format: &str, a: &[(String, f64)], b: &[(String, f64)], rel_tol: f64, min_rho: f64) {
    let mut worst: f64 = 0.0;
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let rel = (x - y).abs() / x.abs().max(f64::MIN_POSITIVE);
        eprintln!("{format} {name:<44} f32 {x:>12.5e} bf16 {y:>12.5e} rel {rel:.3}");
        worst = worst.max(rel);
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = a.iter().zip(b).map(|(x, y)| (x.1, y.1)).unzip();
    let rho = qpipe_stages::stats::spearman(&xs, &ys).unwrap();
    eprintln!("{format}: worst rel {worst:.3}, spearman {rho:.4}");
    assert!(rho >= min_rho, "{format}: ranking ρ = {rho:.4} < {min_rho}");
    assert!(worst <= rel_tol, "{format}: scores differ by up to {worst:.3} > {rel_tol}");
}

/// On a GPU (the `cuda` feature and a device): bf16 against the CPU's f32 within the bf16
/// bounds above, and f32 within the scorer's parity bounds (1e-3, ρ ≥ 0.999).
#[cfg(feature = "cuda")]
#[test]
fn gpu_scores_agree_with_cpu_scores() {
    if qpipe_compute::device::cuda_device_count() == 0 {
        eprintln!("SKIPPED: no CUDA device; GPU scoring was not compared with the CPU");
        return;
    }
    let ckpt = bf16_checkpoint();
    let (cpu, gpu) = (candle_core::Device::Cpu, candle_core::Device::new_cuda(0).unwrap());
    for format in ["INT8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG"] {
        let reference = scores(ckpt.path(), DType::F32, &cpu, format);
        compare(format, &reference, &scores(ckpt.path(), DType::F32, &gpu, format), 1e-3, 0.999);
        compare(format, &reference, &scores(ckpt.path(), DType::BF16, &gpu, format), REL_TOL, MIN_SPEARMAN);
    }
}
