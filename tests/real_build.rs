//! End-to-end builds of the real pipeline on the embedded tiny Qwen3-VL checkpoint:
//! every quant pair scores, a second build and a build after `clean` do no work, and the
//! committed baselines are up to date and at parity on a fresh copy.

use std::fs;
use std::path::Path;

mod support;
use support::real::{copy_into, qpipe, repo, text, workspace_copy};

fn pair_names() -> Vec<String> {
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(repo().join("pipeline.yaml")).unwrap()).unwrap();
    yaml["groups"]["quant_pair"].as_mapping().unwrap().keys().map(|k| k.as_str().unwrap().to_string()).collect()
}

fn files_named(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.file_name().to_string_lossy().ends_with(suffix))
        .map(|e| e.into_path())
        .collect()
}

#[test]
fn every_pair_builds_and_clean_never_forces_rescoring() {
    let dir = workspace_copy();
    // `clean` asks git which files are ignored: make the copy a work tree with the repo's rules.
    copy_into(dir.path(), &[".gitignore", "models/.gitignore"]);
    let git = std::process::Command::new("git").args(["init", "-q"]).current_dir(dir.path()).status().unwrap();
    assert!(git.success());
    let pairs = pair_names();
    assert_eq!(pairs.len(), 16, "W ∈ {{int4, int8, fp4, fp8}} × A ∈ {{int4, int8, fp8, fp16}}");
    let sweep = format!("quant_pair={}", pairs.join(","));
    let args = [
        "output_layout=tmp",
        sweep.as_str(),
        "dataset.max_calib_samples=8",
        "dataset.calib_seq_len=32",
        "autoquant.batch_size=4",
    ];
    let build = |extra: &[&str]| {
        let mut a = vec!["build"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&args);
        let o = qpipe(dir.path(), &a);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        err
    };
    build(&[]);

    let manifests = files_named(&dir.path().join("tmp/runs"), "_quant_manifest.json");
    assert_eq!(manifests.len(), 16, "{manifests:?}");
    for m in &manifests {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(m).unwrap()).unwrap();
        // 4 layers × 7 Linears, grouped into 4 recipes per layer (qkv, o, gate/up, down).
        assert_eq!(v["num_quantized_layers"], 28, "{}", m.display());
        let recipes = v["layer_sensitivity"].as_object().unwrap();
        assert_eq!(recipes.len(), 16, "{}", m.display());
        let importances: Vec<f64> = recipes.values().map(|r| r["importance"].as_f64().unwrap()).collect();
        assert!(importances.iter().all(|x| x.is_finite() && *x >= 0.0), "{}: {importances:?}", m.display());
        assert!(importances.iter().any(|x| *x > 0.0), "{}: quantizing changed nothing", m.display());
        let run = m.parent().unwrap();
        for f in ["per-layer-sensitivity.json", "per-layer-sensitivity.md", "per-layer-sensitivity.svg"] {
            assert!(run.join(f).is_file(), "{} lacks {f}", run.display());
        }
    }

    let err = build(&[]);
    assert!(err.contains("(0 ran"), "a second build must do nothing:\n{err}");

    let o = qpipe(dir.path(), &["clean"]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(files_named(dir.path(), ".pt").is_empty(), "clean leaves no .pt intermediates");
    let mut status = vec!["status"];
    status.extend_from_slice(&args);
    let o = qpipe(dir.path(), &status);
    assert_eq!(o.status.code(), Some(0), "status after clean: {}{}", text(&o).0, text(&o).1);
    let err = build(&[]);
    assert!(err.contains("(0 ran"), "clean must not force re-scoring:\n{err}");
}

#[test]
fn committed_baselines_are_up_to_date_and_at_parity() {
    let dir = workspace_copy();
    copy_into(dir.path(), &["qpipe.lock", "models/tiny_qwen3_vl/layer-analysis"]);
    let o = qpipe(dir.path(), &["status"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "a fresh copy of the committed analyses is up to date:\n{out}{err}");
    let o = qpipe(dir.path(), &["verify", "--parity", "weight-int8-act-int8"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    // verify rebuilds into a scratch area and leaves the committed files alone.
    let committed = "models/tiny_qwen3_vl/layer-analysis/weight-int8-act-int8/README.md";
    assert_eq!(fs::read(dir.path().join(committed)).unwrap(), fs::read(repo().join(committed)).unwrap());
}

#[test]
fn the_compute_dtype_is_in_the_key_and_bf16_and_f64_builds_score_in_them() {
    let dir = workspace_copy();
    let args =
        ["output_layout=tmp", "quant_pair=wint8_aint8", "dataset.max_calib_samples=8", "dataset.calib_seq_len=32"];
    let run = |extra: &str| {
        let mut a = vec!["build", extra];
        a.extend_from_slice(&args);
        let o = qpipe(dir.path(), &a);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        err
    };
    run("autoquant.dtype=auto");
    let err = run("autoquant.dtype=bf16");
    assert!(err.contains("(bf16 on cpu)") && !err.contains("(0 ran"), "bf16 must re-score, in bf16:\n{err}");
    let states = files_named(&dir.path().join("tmp/runs"), "_autoquant_state.json");
    assert_eq!(states.len(), 1, "{states:?}");
    let state: serde_json::Value = serde_json::from_slice(&fs::read(&states[0]).unwrap()).unwrap();
    assert_eq!((state["device"].as_str(), state["dtype"].as_str()), (Some("cpu"), Some("bf16")));
    // Back to f32 (what `auto` is on the CPU): the scores are named by what they depend
    // on, the dtype included, so the f32 scores of the first build are still there and only
    // the search (and what reads it) re-runs, rewriting the run folder from them.
    let err = run("autoquant.dtype=f32");
    assert!(!err.contains("Running score@") && err.contains("Running search@"), "{err}");
    let state: serde_json::Value = serde_json::from_slice(&fs::read(&states[0]).unwrap()).unwrap();
    assert_eq!(state["dtype"].as_str(), Some("f32"));
    // f64, the rounding-free reference, on the CPU: scores within f32 noise of f32's.
    let f32_scores = state["candidate_stats"].clone();
    let err = run("autoquant.dtype=f64");
    assert!(err.contains("(f64 on cpu)") && err.contains("Running score@"), "f64 must re-score, in f64:\n{err}");
    let state: serde_json::Value = serde_json::from_slice(&fs::read(&states[0]).unwrap()).unwrap();
    assert_eq!(state["dtype"].as_str(), Some("f64"));
    for (name, r) in state["candidate_stats"].as_object().unwrap() {
        let (a, b) = (r["scores"][0].as_f64().unwrap(), f32_scores[name]["scores"][0].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-2 * b.abs(), "{name}: f64 {a} vs f32 {b}");
    }
}

/// A new bit budget re-runs the search (and what reads it), never the scoring: the scores
/// are named by what they depend on, so an ad-hoc run that differs from a published one
/// only in `autoquant.effective_bits` (and its output folder) reuses the published run's.
#[test]
fn a_new_bit_budget_searches_the_saved_scores_without_scoring() {
    let dir = workspace_copy();
    copy_into(dir.path(), &["qpipe.lock", "models/tiny_qwen3_vl/layer-analysis"]);
    let run = "models/tiny_qwen3_vl/layer-analysis/weight-int8-act-int8/tiny_qwen3_vl_autoquant_int8_lm_small";
    // The scores are git-ignored intermediates: make them (a clone has none).
    let o = qpipe(dir.path(), &["build", "--force", run]);
    assert!(o.status.success(), "{}", text(&o).1);
    let adhoc = ["quant_pair=wint8_aint8", "dataset.size=small", "output_layout=tmp", "-v"];
    for bits in ["12.0", "10.0"] {
        let budget = format!("autoquant.effective_bits={bits}");
        let mut args = vec!["build", budget.as_str()];
        args.extend(adhoc);
        let t0 = std::time::Instant::now();
        let o = qpipe(dir.path(), &args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        eprintln!("effective_bits={bits}: {:.2} s for the whole command", t0.elapsed().as_secs_f64());
        assert!(err.contains("Fresh score@") && !err.contains("Running score@"), "scoring re-ran:\n{err}");
        for kind in ["search", "aggregate", "render"] {
            assert!(err.contains(&format!("Running {kind}@tmp/runs/")), "{kind} did not run:\n{err}");
        }
        let states = files_named(&dir.path().join("tmp/runs"), "_autoquant_state.json");
        assert_eq!(states.len(), 1, "{states:?}");
        let state: serde_json::Value = serde_json::from_slice(&fs::read(&states[0]).unwrap()).unwrap();
        assert_eq!(state["constraints"]["effective_bits"].as_f64(), Some(bits.parse().unwrap()));
        // The same scores as the published run's.
        let published = files_named(&dir.path().join(run), "_autoquant_state.json");
        let published: serde_json::Value = serde_json::from_slice(&fs::read(&published[0]).unwrap()).unwrap();
        assert_eq!(state["candidate_stats"], published["candidate_stats"]);
    }
}

/// The shared cache across clones: one workspace scores a run, another with the same
/// sources (no analyses, no lock) builds it with nothing run — every stage restored.
#[test]
fn a_second_clone_restores_a_run_from_the_shared_cache() {
    let cache = tempfile::tempdir().unwrap();
    let with_cache = |dir: &Path, args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_qpipe"))
            .current_dir(dir)
            .args(args)
            .env("NO_COLOR", "1")
            .env("QPIPE_CACHE_DIR", cache.path())
            .output()
            .unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        err
    };
    let run = [
        "build",
        "output_layout=tmp",
        "quant_pair=wint8_aint8",
        "dataset.max_calib_samples=8",
        "dataset.calib_seq_len=32",
    ];
    let (a, b) = (workspace_copy(), workspace_copy());
    let err = with_cache(a.path(), &run);
    assert!(err.contains("Running score@"), "{err}");
    let err = with_cache(b.path(), &run);
    assert!(err.contains("(0 ran, 6 restored from the cache, 0 fresh)") && !err.contains("Running"), "{err}");
    for f in files_named(&a.path().join("tmp/runs"), ".json") {
        let rel = f.strip_prefix(a.path()).unwrap();
        assert_eq!(fs::read(&f).unwrap(), fs::read(b.path().join(rel)).unwrap(), "{}", rel.display());
    }
}

/// Pairs built in one command share one scoring pass (one calibration forward; for
/// `gradient` one forward and backward per batch, for `kl_div` one unquantized forward per
/// batch) and write, byte for byte, what each pair built alone writes.
#[test]
fn fused_scoring_writes_the_bytes_of_each_pair_scored_alone() {
    let cases: [(&str, &[&str]); 2] = [
        ("gradient", &["wint8_aint8", "wint8_afp16", "wfp8_afp8", "wfp8_afp16"]),
        ("kl_div", &["wint8_aint8", "wfp8_afp16"]),
    ];
    for (method, pairs) in cases {
        let method_arg = format!("autoquant.method={method}");
        let small = [
            "output_layout=tmp",
            "dataset.max_calib_samples=8",
            "dataset.calib_seq_len=32",
            "autoquant.batch_size=4",
            method_arg.as_str(),
        ];
        let build = |dir: &Path, pair: &str| {
            let mut args = vec!["build", "-v", pair];
            args.extend(small);
            let o = qpipe(dir, &args);
            let (out, err) = text(&o);
            assert!(o.status.success(), "{out}{err}");
            err
        };
        let (fused, alone) = (workspace_copy(), workspace_copy());
        let err = build(fused.path(), &format!("quant_pair={}", pairs.join(",")));
        assert!(err.contains(&format!("score: {} formats in one pass", pairs.len())), "{method}: {err}");
        for p in pairs {
            let err = build(alone.path(), &format!("quant_pair={p}"));
            assert!(!err.contains("formats in one pass"), "{err}");
        }
        let files = files_named(&alone.path().join("tmp/runs"), "");
        assert!(files.len() >= pairs.len() * 5, "{files:?}");
        for f in files {
            let rel = f.strip_prefix(alone.path()).unwrap();
            assert!(
                fs::read(&f).unwrap() == fs::read(fused.path().join(rel)).unwrap(),
                "{method}: {} differs",
                rel.display()
            );
        }
    }
}

/// `qpipe status` with a new budget for the published run (the user's "what if") says what
/// would re-run — the search and what reads it, not the scoring — and that a build would
/// refuse to overwrite the published run without `--overwrite-published`.
#[test]
fn status_of_a_new_budget_shows_the_search_stale_and_the_scores_fresh() {
    let dir = workspace_copy();
    copy_into(dir.path(), &["qpipe.lock", "models/tiny_qwen3_vl/layer-analysis"]);
    let o = qpipe(dir.path(), &["status", "autoquant.effective_bits=12.0"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("stale search@") && out.contains("`effective_bits`: 8.0 → 12.0"), "{out}");
    assert!(!out.contains("stale score@"), "{out}");
    assert!(err.contains("`qpipe build` would refuse these overrides"), "{err}");
    let o = qpipe(dir.path(), &["build", "autoquant.effective_bits=12.0"]);
    let err = text(&o).1;
    assert!(!o.status.success() && err.contains("would overwrite the published"), "{err}");
}

/// Image-text calibration end to end on the tiny model: a whole-model run scores the tower,
/// the language model and `lm_head`; an image is an input of the calibration key; a build
/// that must re-score after the intermediates were deleted re-makes both of build-calib's
/// outputs (tokens and image references) first; bad inputs name the file and annotation.
#[test]
fn image_text_calibration_scores_the_whole_model() {
    let dir = workspace_copy();
    let args = ["output_layout=tmp", "dataset=coco_tiny", "autoquant.coverage=full", "dataset.max_calib_samples=8"];
    let build = |extra: &[&str]| {
        let mut a = vec!["build"];
        a.extend_from_slice(&args);
        a.extend_from_slice(extra);
        qpipe(dir.path(), &a)
    };
    let o = build(&[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let manifests = files_named(&dir.path().join("tmp/runs"), "_quant_manifest.json");
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    let v: serde_json::Value = serde_json::from_slice(&fs::read(&manifests[0]).unwrap()).unwrap();
    let groups = v["layer_sensitivity"].as_object().unwrap();
    assert_eq!(groups.len(), 30, "13 tower groups, 16 language-model groups, lm_head");
    assert!(groups.contains_key("model.visual.patch_embed.proj.quant_recipe"));
    assert!(groups.contains_key("lm_head.quant_recipe"));
    assert_eq!(v["scheme"]["coverage_mode"], "full");
    // The tower's scores are real: positive, and the conv is not a `layers` entry.
    assert!(groups["model.visual.blocks.0.mlp.linear_fc2.quant_recipe"]["scores"][0].as_f64().unwrap() > 0.0);
    assert!(!v["layers"].as_object().unwrap().contains_key("model.visual.patch_embed.proj"));

    // An image is an input of the calibration key.
    let coco: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.path().join("data/coco/captions_tiny.json")).unwrap()).unwrap();
    let first = coco["annotations"][0]["image_id"].clone();
    let file = coco["images"].as_array().unwrap().iter().find(|i| i["id"] == first).unwrap()["file_name"].clone();
    let image = dir.path().join("data/coco/images").join(file.as_str().unwrap());
    let o = qpipe(dir.path(), &["status", args[0], args[1], args[2], args[3]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).0);
    let bytes = fs::read(&image).unwrap();
    fs::write(&image, b"not an image").unwrap();
    let o = qpipe(dir.path(), &["status", args[0], args[1], args[2], args[3]]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(image.file_name().unwrap().to_str().unwrap()), "{out}");
    // …and an undecodable one is an error naming the file and the annotation.
    let o = build(&[]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}{err}");
    assert!(err.contains(image.file_name().unwrap().to_str().unwrap()) && err.contains("annotation 0"), "{err}");
    fs::write(&image, bytes).unwrap();

    // Scores must be re-made (a new method), the intermediates are gone: both come back.
    fs::remove_dir_all(dir.path().join("tmp/qpipe/calib")).unwrap();
    let o = build(&["autoquant.method=kl_div"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("Running build-calib@"), "{err}");

    // Images need coverage=full; coverage=full needs images.
    let o = qpipe(dir.path(), &["status", "dataset=coco_tiny"]);
    assert!(text(&o).1.contains("autoquant.coverage"), "{}", text(&o).1);
    let o = qpipe(dir.path(), &["status", "autoquant.coverage=full"]);
    assert!(text(&o).1.contains("dataset.coco_captions"), "{}", text(&o).1);
}
