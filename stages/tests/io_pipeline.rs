//! The planner's fetch-model and build-calib instances, run by the real stages on the
//! embedded tiny checkpoint and the project's captions: what the planner declares (params,
//! deps, locators, outs) is what the stages expect. Prints wall times (run with
//! `--nocapture` to see them).

use std::path::{Path, PathBuf};
use std::time::Instant;

use qpipe_contract::{Instance, Job, JobFile, PlanContext, Run, Silent, Stage};
use qpipe_stages::build_calib::BuildCalib;
use qpipe_stages::fetch_model::FetchModel;
use qpipe_stages::io::calib::load_calib;
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn config(size: &str) -> Value {
    json!({
        "experiment": "io",
        "model": {"name": "tiny_qwen3_vl", "path": "models/tiny_qwen3_vl/checkpoint", "run_prefix": "tiny_qwen3_vl"},
        "dataset": {"name": "captions", "captions_path": "data/calibration/captions.txt", "size": size,
                    "size_to_max_samples": {"small": 16, "medium": 128, "large": 512},
                    "max_calib_samples": null, "calib_seq_len": 512},
        "quant_pair": {"name": "wfp8_afp16", "weight": "fp8", "activation": "fp16",
                       "format_name": "FP8_WEIGHT_ONLY_CFG", "experimental": false},
        "quant_granularity": {"name": "default", "quant_cfg_overrides": {}},
        "autoquant": {"method": "gradient", "batch_size": 8, "score_size": 128,
                      "effective_bits": 8.0, "device": "cpu"},
        "output_layout": {"name": "tmp", "mode": "tmp", "root_dir": "tmp/runs/tiny"},
        "runner": {"output_dir": null}
    })
}

/// Runs one instance with its outputs redirected into `out_dir`; returns the out paths.
fn run(stage: &dyn Stage, inst: &Instance, root: &Path, deps: Vec<PathBuf>, out_dir: &Path) -> Vec<PathBuf> {
    let deps: Vec<JobFile> = inst.deps.iter().zip(deps).map(|(d, p)| JobFile::new(&d.name, p)).collect();
    let outs: Vec<JobFile> = inst
        .outs
        .iter()
        .map(|o| JobFile::new(&o.name, out_dir.join(o.path.file_name().unwrap()).with_extension("tmp")))
        .collect();
    let finals: Vec<JobFile> = inst.outs.iter().map(|o| JobFile::new(&o.name, &o.path)).collect();
    let job = Job {
        id: &inst.id,
        root,
        params: &inst.params,
        locators: &inst.locators,
        deps: &deps,
        outs: &outs,
        final_outs: &finals,
        progress: &Silent,
    };
    let t0 = Instant::now();
    stage.run(&job).unwrap_or_else(|e| panic!("{}: {e:#}", inst.id));
    eprintln!("{:<60} {:>8.1} ms", inst.id, t0.elapsed().as_secs_f64() * 1e3);
    outs.into_iter().map(|o| o.path).collect()
}

#[test]
fn planned_fetch_and_calibration_run() {
    let root = root();
    let ctx = PlanContext { root: root.clone(), pipeline_file: root.join("pipeline.yaml") };
    let tmp = tempfile::tempdir().unwrap();
    for (size, n) in [("small", 16), ("large", 512)] {
        let runs = [Run { config: config(size), overrides: vec![], published: false }];
        let instances = qpipe_stages::plan::plan(&ctx, &runs).unwrap().instances;
        let fetch = instances.iter().find(|i| i.kind == "fetch-model").unwrap();
        let calib = instances.iter().find(|i| i.kind == "build-calib").unwrap();
        let fetch_out =
            run(&FetchModel, fetch, &root, fetch.deps.iter().map(|d| root.join(&d.path)).collect(), tmp.path());
        // build-calib reads the fetch output where the engine would have put it.
        let deps: Vec<PathBuf> = calib
            .deps
            .iter()
            .map(
                |d| if fetch.outs.iter().any(|o| o.path == d.path) { fetch_out[0].clone() } else { root.join(&d.path) },
            )
            .collect();
        let calib_out = run(&BuildCalib, calib, &root, deps, tmp.path());
        let set = load_calib(&calib_out[0]).unwrap();
        assert_eq!((set.n, set.t), (n, 512));
        assert_eq!(set.pad_token_id, 0);
        // Left padding: every row ends with a real token, and the short captions start with pads.
        assert!((0..set.n).all(|i| set.attention_mask[i * set.t + set.t - 1] == 1));
        assert_eq!(set.attention_mask[0], 0);
    }
}
