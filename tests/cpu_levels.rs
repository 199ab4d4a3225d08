//! The committed analyses are the bytes every x86-64 CPU writes: the real scorer, forced to
//! each vector level this CPU has (`QPIPE_SIMD`) and run on different thread counts,
//! rebuilds three published runs — one on the integer-product path (INT8 × INT8), one on
//! the f32 GEMM path (FP8 weights, unquantized inputs), one of the whole model on images
//! (the vision tower) — and must write the committed files byte for byte.

use std::fs;
use std::path::Path;

mod support;
use support::real::{copy_into, repo, text, workspace_copy};

const RUNS: [&str; 3] = [
    "models/tiny_qwen3_vl/layer-analysis/weight-int8-act-int8/tiny_qwen3_vl_autoquant_int8_lm_small",
    "models/tiny_qwen3_vl/layer-analysis/weight-fp8-act-fp16/tiny_qwen3_vl_autoquant_wfp8_afp16_lm_small",
    // The whole model on images: the vision tower's forward and backward too.
    "models/tiny_qwen3_vl/layer-analysis/weight-int8-act-int8/tiny_qwen3_vl_autoquant_all_layers_int8_small",
];

/// The levels this CPU supports, as `QPIPE_SIMD` names them (the conditions of
/// `qpipe_compute::simd::detected`, which this binary-only package does not link).
fn levels() -> Vec<&'static str> {
    let mut out = vec!["scalar"];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            out.push("avx2");
        }
        if has!("avx512f") && has!("avx512bw") && has!("fma") {
            out.push("avx512");
            if has!("avx512vnni") {
                out.push("vnni");
            }
        }
    }
    out
}

fn tracked_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && !e.file_name().to_string_lossy().ends_with(".pt"))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    files
}

#[test]
fn every_vector_level_and_thread_count_writes_the_committed_bytes() {
    let dir = workspace_copy();
    copy_into(dir.path(), &["qpipe.lock", "models/tiny_qwen3_vl/layer-analysis"]);
    let levels = levels();
    eprintln!("vector levels checked on this CPU: {}", levels.join(", "));
    // Each level once, on a thread count that differs from the one before.
    for (i, level) in levels.iter().enumerate() {
        let threads = [1, 3, 2, 4][i % 4].to_string();
        let mut args = vec!["build", "--force"];
        args.extend(RUNS);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_qpipe"))
            .current_dir(dir.path())
            .args(&args)
            .env("NO_COLOR", "1")
            .env("QPIPE_SIMD", level)
            .env("RAYON_NUM_THREADS", &threads)
            .output()
            .unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "QPIPE_SIMD={level}:\n{out}{err}");
        assert!(!err.contains("different bytes"), "QPIPE_SIMD={level} RAYON_NUM_THREADS={threads}:\n{err}");
        for run in RUNS {
            let files = tracked_files(&repo().join(run));
            assert!(files.len() >= 5, "{run}: {files:?}");
            for f in files {
                let rel = f.strip_prefix(repo()).unwrap();
                assert!(
                    fs::read(dir.path().join(rel)).unwrap() == fs::read(&f).unwrap(),
                    "QPIPE_SIMD={level} RAYON_NUM_THREADS={threads} wrote other bytes to {}",
                    rel.display()
                );
            }
        }
    }
}
