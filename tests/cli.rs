//! End-to-end tests of the real `qpipe` binary (the Qwen3-VL domain) that run no stage:
//! planning the repository's pipeline, errors, help, the cross-process build lock.

use std::fs;

mod support;
use support::real::{qpipe, repo, text, workspace_copy};

#[test]
fn the_repository_pipeline_plans_into_a_dag() {
    let o = qpipe(&repo(), &["dag"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("fetch-model@models/tiny_qwen3_vl/checkpoint"), "{out}");
    assert!(out.contains("weight-fp8-act-fp16") && out.contains("weight-int8-act-int8"), "{out}");
    let o = qpipe(&repo(), &["dag", "--format", "json", "quant_pair=wfp8_afp16", "dataset.size=small,medium,large"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let scores = j["nodes"].as_array().unwrap().iter().filter(|n| n["kind"] == "score").count();
    assert_eq!(scores, 3);
}

#[test]
fn the_whole_grid_dry_runs_and_skips_only_what_cannot_be_built() {
    // 16 pairs × 9 granularities × 3 sizes on the embedded default model, into tmp/.
    let args = [
        "build",
        "--dry-run",
        "output_layout=tmp",
        "quant_pair=glob(*)",
        "quant_granularity=glob(*)",
        "dataset.size=small,medium,large",
    ];
    let o = qpipe(&repo(), &args);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // FP4 (E2M1) weights have no per-tensor or per-channel form: 4 FP4 pairs × 4 overlays × 3 sizes.
    assert!(err.contains("48 of 432 runs skipped"), "{err}");
    for g in ["w_per_tensor", "w_per_out_channel", "w_per_in_channel", "recipe_match_channel_token"] {
        let line = format!("skipping 3 runs: quant_pair `wfp4_afp8` × quant_granularity `{g}`");
        assert!(err.contains(&line), "{line}\n{err}");
    }
    assert_eq!(err.matches("Would run search@").count(), 384, "{err}");
    // The scores of the 9 published runs are shared with their tmp-layout twins: fresh
    // where this checkout has built them (their scores are git-ignored intermediates).
    let scores = err.matches("Would run score@").count();
    assert!((375..=384).contains(&scores), "{scores} scores would run:\n{err}");
    // One recipe per model × size × granularity whose runs can be built (pairs ≥ 2).
    assert_eq!(err.matches("Would run recipe@").count(), 27, "{err}");
    assert!(err.contains("weight-fp4-act-fp8/w_group64/"), "{err}");
    assert!(err.contains("quant pair `wint4_aint4` (INT4_WEIGHT_INT4_ACT_CFG) is marked experimental"), "{err}");
    // Asked for alone, the same cell is an error naming pair, overlay and reason.
    let o = qpipe(&repo(), &["build", "--dry-run", "quant_pair=wfp4_afp8", "quant_granularity=w_per_out_channel"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("wfp4_afp8") && err.contains("w_per_out_channel") && err.contains("E2M1"), "{err}");
}

#[test]
fn unknown_pairs_suggest_the_nearest() {
    let o = qpipe(&repo(), &["dag", "quant_pair=wfp8_afp61"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.starts_with("error: unknown option `wfp8_afp61` for group `quant_pair`"), "{err}");
    assert!(err.contains("did you mean `wfp8_afp16`?"), "{err}");
    let o = qpipe(&repo(), &["status", "autoquant.batchsize=4"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("did you mean `autoquant.batch_size`?"), "{err}");
}

#[test]
fn malformed_yaml_points_at_the_line() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("bad.yaml"), "version: 1\ndefaults:\n  model: [tiny\n").unwrap();
    let o = qpipe(dir.path(), &["status", "--pipeline", "bad.yaml"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("bad.yaml:4:1:") || err.contains("bad.yaml:3:"), "{err}");
}

#[test]
fn a_fresh_workspace_is_stale_and_dry_run_writes_nothing() {
    let dir = workspace_copy();
    let o = qpipe(dir.path(), &["status"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(out.contains("never built"), "{out}");
    let o = qpipe(dir.path(), &["build", "--dry-run", "models/tiny_qwen3_vl/layer-analysis/weight-fp8-act-fp16"]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("Would run fetch-model@") && err.contains("Would run score@"), "{err}");
    assert!(!err.contains("weight-int8-act-int8"), "{err}");
    assert!(!dir.path().join("qpipe.lock").exists());
    assert!(!dir.path().join("models/tiny_qwen3_vl/layer-analysis").exists());
}

#[test]
fn two_processes_cannot_build_the_same_tree() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("pipeline.yaml"), "version: 1\n").unwrap();
    fs::create_dir_all(dir.path().join("tmp/qpipe")).unwrap();
    let f = fs::File::create(dir.path().join("tmp/qpipe/build.lock")).unwrap();
    f.try_lock().unwrap();
    let o = qpipe(dir.path(), &["build"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("another qpipe process is building"), "{err}");
    drop(f);
    let o = qpipe(dir.path(), &["build"]);
    assert!(o.status.success(), "{}", text(&o).1);
}

#[test]
fn help_and_version() {
    for args in [&["--help"][..], &["build", "--help"], &["verify", "--help"], &["--version"]] {
        let o = qpipe(&repo(), args);
        assert!(o.status.success(), "{args:?}");
        assert!(!o.stdout.is_empty());
    }
    assert_eq!(qpipe(&repo(), &["verify"]).status.code(), Some(2), "--parity is required");
}

#[test]
fn verify_selects_published_runs_by_folder_name() {
    let dir = workspace_copy();
    let o = qpipe(dir.path(), &["verify", "--parity", "weight-int8-act-int8"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "nothing is committed in a fresh copy: {out}{err}");
    // The three LM-only INT8 runs and the three whole-model (all-layers) ones.
    assert_eq!(out.matches("does not exist").count(), 6, "{out}");
    assert!(out.contains("tiny_qwen3_vl_autoquant_int8_lm_medium"), "{out}");
    assert!(out.contains("tiny_qwen3_vl_autoquant_all_layers_int8_medium"), "{out}");
    let o = qpipe(dir.path(), &["verify", "--parity", "weight-int9-act-int8"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("did you mean `weight-int8-act-int8`?"), "{err}");
}

/// A value of the wrong type or out of range is traced to where it was set: the line and
/// column in `pipeline.yaml`, or the command-line override.
#[test]
fn schema_errors_point_at_the_file_line_or_the_override() {
    let dir = workspace_copy();
    let o = qpipe(dir.path(), &["status", "autoquant.batch_size=eight"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the override `autoquant.batch_size=eight`: key `autoquant.batch_size`: invalid type"),
        "{err}"
    );

    let yaml = fs::read_to_string(dir.path().join("pipeline.yaml")).unwrap();
    let (line, text_line) = yaml.lines().enumerate().find(|(_, l)| l.contains("batch_size: 8")).unwrap();
    let col = text_line.find('8').unwrap() + 1;
    fs::write(dir.path().join("pipeline.yaml"), yaml.replacen("batch_size: 8", "batch_size: eight", 1)).unwrap();
    let o = qpipe(dir.path(), &["status"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let at = format!("pipeline.yaml:{}:{col}: key `autoquant.batch_size`: invalid type", line + 1);
    assert!(err.contains(&at), "want `{at}` in:\n{err}");

    // a check after parsing (0 is a number, but not a batch size)
    fs::write(dir.path().join("pipeline.yaml"), yaml.replacen("batch_size: 8", "batch_size: 0", 1)).unwrap();
    let err = text(&qpipe(dir.path(), &["status"])).1;
    let at = format!("pipeline.yaml:{}:{col}: key `autoquant.batch_size`: must be at least 1", line + 1);
    assert!(err.contains(&at), "want `{at}` in:\n{err}");
}
