//! The `score` stage end to end on the embedded tiny checkpoint: calibration `.pt` in, state
//! `.pt` + `.json` out, numbers equal to the ModelOpt oracle's for the same tokens.

use std::path::PathBuf;

use qpipe_contract::{Job, JobFile, Silent, Stage};
use qpipe_stages::io::calib::CalibSet;
use qpipe_stages::score::Score;
use qpipe_stages::search::Search;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn score_stage_writes_the_state_modelopt_writes() {
    let oracle: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("stages/tests/fixtures/oracle_modelopt.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(oracle["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<u32>> = serde_json::from_value(oracle["attention_mask"].clone()).unwrap();
    let (n, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat();
    let set = CalibSet {
        n,
        t,
        labels: flat.iter().map(|&i| i64::from(i)).collect(),
        input_ids: flat,
        attention_mask: mask.concat(),
        pad_token_id: oracle["pad_token_id"].as_u64().unwrap() as u32,
    };
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.pt");
    qpipe_stages::io::torch_pt::write(&calib, &set.to_pt().unwrap()).unwrap();
    let identity = dir.path().join("identity.json");
    std::fs::write(&identity, "{}").unwrap();
    let ckpt = root().join("models/tiny_qwen3_vl/checkpoint");
    let case = &oracle["cases"]["int8_weight_only_gradient"];
    let params = json!({
        "method": "gradient",
        "format": {"name": "INT8_WEIGHT_ONLY_CFG", "granularity": "default", "quant_cfg_overrides": {}},
        "batch_size": oracle["batch_size"], "score_size": oracle["score_size"], "device": "auto",
    });
    let locators = json!({"checkpoint": {"source": "local", "path": "models/tiny_qwen3_vl/checkpoint"}});
    let deps = vec![JobFile::new("identity", identity), JobFile::new("calib", calib), JobFile::new("checkpoint", ckpt)];
    let scores = vec![JobFile::new("scores", dir.path().join("scores.json.tmp"))];
    let root = root();
    let job = Job {
        id: "score@test",
        root: &root,
        params: &params,
        locators: &locators,
        deps: &deps,
        outs: &scores,
        final_outs: &[JobFile::new("scores", "scores.json")],
        progress: &Silent,
    };
    Score.run(&job).unwrap();
    // The search stage applies the budget to the saved scores.
    let search_params = json!({"method": "gradient", "effective_bits": case["effective_bits"]});
    let outs = vec![
        JobFile::new("state_pt", dir.path().join("s.pt.tmp")),
        JobFile::new("state_json", dir.path().join("s.json.tmp")),
    ];
    let finals = vec![JobFile::new("state_pt", "s.pt"), JobFile::new("state_json", "s.json")];
    let job = Job {
        id: "search@test",
        root: &root,
        params: &search_params,
        locators: &json!({}),
        deps: &[JobFile::new("scores", &scores[0].path)],
        outs: &outs,
        final_outs: &finals,
        progress: &Silent,
    };
    Search.run(&job).unwrap();
    let state: Value = serde_json::from_str(&std::fs::read_to_string(&outs[1].path).unwrap()).unwrap();
    assert_eq!(state["format"], "qpipe.autoquant_state/1");
    assert_eq!(state["method"], "gradient");
    assert_eq!(state["device"], "cpu");
    assert_eq!(state["dtype"], "f32");
    assert_eq!(state["num_calib_steps"], oracle["num_calib_steps"]);
    assert_eq!(state["num_score_steps"], oracle["num_score_steps"]);
    assert_eq!(state["quantized_layers"].as_array().unwrap().len(), 28);
    assert_eq!(state["best"]["recipe"], case["best"]["recipe"]);
    assert_eq!(state["constraints"]["effective_bits"], case["effective_bits"]);
    for (name, t) in case["candidate_stats"].as_object().unwrap() {
        let m = &state["candidate_stats"][name];
        assert_eq!(m["formats"], t["formats"]);
        assert_eq!(m["costs"], t["costs"]);
        let (a, b) = (m["scores"][0].as_f64().unwrap(), t["scores"][0].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-3 * b.abs(), "{name}: {a} vs ModelOpt {b}");
    }
    // The .pt holds the same tree; torch opens it when it is installed.
    let pt = &outs[0].path;
    assert!(std::fs::metadata(pt).unwrap().len() > 0);
    let code = "import json,sys,torch; s=torch.load(sys.argv[1], weights_only=True); j=json.load(open(sys.argv[2])); \
                assert s == j, 'state .pt differs from .json'; print('ok')";
    match std::process::Command::new("python3").arg("-c").arg(code).arg(pt).arg(&outs[1].path).output() {
        Ok(o) if o.status.success() => assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok"),
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'torch'") => {
            eprintln!("SKIP: python3 has no torch; the state .pt was not opened with torch.load")
        }
        Ok(o) => panic!("torch.load of the state .pt failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => eprintln!("SKIP: python3 not found; the state .pt was not opened with torch.load"),
    }
}

#[test]
fn score_stage_rejects_a_cuda_device() {
    let params = json!({
        "method": "gradient", "format": {"name": "INT8_DEFAULT_CFG"},
        "batch_size": 8, "score_size": 128, "device": "cuda:0",
    });
    let root = root();
    let (deps, outs, finals) = (vec![], vec![], vec![]);
    let job = Job {
        id: "score@test",
        root: &root,
        params: &params,
        locators: &json!({}),
        deps: &deps,
        outs: &outs,
        final_outs: &finals,
        progress: &Silent,
    };
    let e = format!("{:#}", Score.run(&job).unwrap_err());
    assert!(e.contains("autoquant.device"), "{e}");
}
