//! The `recipe` stage on the embedded model: a recipe across pairs built from their saved
//! scores, its prediction equal to the chosen scores' sum, its exports, a new budget list
//! re-running nothing upstream, and (when Python has ModelOpt) the ModelOpt export loading.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::real::{qpipe, text, workspace_copy};

const RUN: [&str; 6] = [
    "quant_pair=wint8_aint8,wfp8_afp16,wfp4_afp16",
    "dataset.size=small",
    "dataset.max_calib_samples=8",
    "dataset.calib_seq_len=32",
    "recipe.holdout_samples=16",
    "output_layout=tmp",
];

fn build(dir: &Path, extra: &[&str]) -> String {
    let mut a = vec!["build"];
    a.extend_from_slice(&RUN);
    a.extend_from_slice(extra);
    let o = qpipe(dir, &a);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    err
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn a_recipe_across_pairs_is_the_sum_of_the_chosen_scores_and_a_new_budget_reruns_only_it() {
    let d = workspace_copy();
    let dir = d.path();
    let err = build(dir, &[]);
    assert!(err.contains("Running recipe@tmp/runs/tiny_qwen3_vl/recipes/small"), "{err}");
    let rdir = dir.join("tmp/runs/tiny_qwen3_vl/recipes/small");
    let recipe = json(&rdir.join("recipe.json"));
    assert_eq!(recipe["format"], "qpipe.recipe/1");
    // Each pair's scores, from its run folder's AutoQuant state.
    let pair_scores = |pair: &str| -> Value {
        let runs = dir.join("tmp/runs/tiny_qwen3_vl");
        let f = walkdir::WalkDir::new(&runs)
            .into_iter()
            .flatten()
            .find(|e| {
                let n = e.file_name().to_string_lossy();
                n.ends_with("_autoquant_state.json") && e.path().to_string_lossy().contains(&format!("_{pair}_"))
                    || (pair == "wint8_aint8" && n == "int8_autoquant_lm_default_autoquant_state.json")
            })
            .unwrap_or_else(|| panic!("no state for {pair}"));
        json(f.path())["candidate_stats"].clone()
    };
    let tables: Vec<(String, Value)> =
        ["wint8_aint8", "wfp8_afp16", "wfp4_afp16"].iter().map(|p| (p.to_string(), pair_scores(p))).collect();
    let budgets = recipe["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 5);
    let mut last_score = f64::INFINITY;
    for b in budgets {
        let (asked, achieved) = (b["effective_bits"].as_f64().unwrap(), b["achieved_bits"].as_f64().unwrap());
        assert_eq!(b["is_satisfied"], achieved <= asked + 1e-9, "{b}");
        let layers = b["layers"].as_object().unwrap();
        assert_eq!(layers.len(), 16);
        let mut sum = 0.0;
        for (group, pair) in layers {
            let pair = pair.as_str().unwrap();
            if pair == "NONE" {
                continue;
            }
            let t = &tables.iter().find(|(p, _)| p == pair).unwrap_or_else(|| panic!("unknown pair {pair}")).1;
            sum += t[format!("{group}.quant_recipe")]["scores"][0].as_f64().unwrap();
        }
        let predicted = b["predicted_score"].as_f64().unwrap();
        assert!((sum - predicted).abs() <= 1e-12 * predicted.abs().max(1e-30), "{asked}: {sum} vs {predicted}");
        // A larger budget never predicts worse.
        assert!(predicted <= last_score * (1.0 + 1e-12) || !b["is_satisfied"].as_bool().unwrap(), "{b}");
        last_score = predicted;
        let v = &b["validation"];
        assert!(v["kl_div"].as_f64().unwrap() >= 0.0 && v["loss_increase"].as_f64().unwrap().is_finite(), "{v}");
        // The exports parse; the ModelOpt one names every chosen Linear.
        let mo = json(&rdir.join(b["exports"]["modelopt"].as_str().unwrap()));
        assert_eq!(mo["algorithm"], "max");
        let text = serde_json::to_string(&mo["quant_cfg"]).unwrap();
        for (group, pair) in layers {
            if pair != "NONE" {
                assert!(text.contains(&format!("language_model.{group}.weight_quantizer")), "{group} missing");
            }
        }
        let yaml: serde_yaml::Value = serde_yaml::from_str(
            &fs::read_to_string(rdir.join(b["exports"]["llm_compressor"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        assert!(yaml["quant_stage"]["quant_modifiers"]["QuantizationModifier"].is_mapping(), "{yaml:?}");
    }
    // The 8-bit budget is met by 8-bit pairs; 4.5 bits needs the NVFP4 pair somewhere.
    assert_eq!(budgets[4]["is_satisfied"], true);
    assert!(budgets[0]["layers"].as_object().unwrap().values().any(|p| p == "wfp4_afp16"), "{}", budgets[0]);
    let pareto = json(&rdir.join("pareto.json"));
    let sweep = pareto["sweep"].as_array().unwrap();
    assert!(sweep.len() > 40 && sweep.last().unwrap()["score"] == 0.0, "{pareto}");
    assert!(fs::read_to_string(rdir.join("pareto.svg")).unwrap().starts_with("<svg"));
    assert!(recipe["validation"]["spearman_predicted_vs_kl_div"].as_f64().is_some(), "{}", recipe["validation"]);

    // Only the budgets change: the recipe re-runs, nothing upstream.
    let err = build(dir, &["recipe.budgets=[6,8]"]);
    assert!(
        err.contains("Running recipe@") && !err.contains("Running score@") && !err.contains("Running search@"),
        "{err}"
    );
    assert!(!err.contains("Running build-calib@"), "{err}");
    let recipe = json(&rdir.join("recipe.json"));
    assert_eq!(recipe["budgets"].as_array().unwrap().len(), 2);

    optional_python_check(&rdir);
}

/// `scripts/check_recipe_exports.py` loads the exports with the real libraries when the
/// Python in `QPIPE_PYTHON` (default `python3`) has them; SKIP otherwise.
fn optional_python_check(rdir: &Path) {
    let py = std::env::var("QPIPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = Command::new(&py).args(["-c", "import modelopt, torch, transformers"]).output();
    if !matches!(&has, Ok(o) if o.status.success()) {
        eprintln!(
            "SKIP the ModelOpt load of the recipe exports: `{py}` lacks modelopt/torch/transformers \
             (pip install nvidia-modelopt torch transformers; QPIPE_PYTHON=/path/to/python)"
        );
        return;
    }
    let script = support::real::repo().join("scripts/check_recipe_exports.py");
    let o = Command::new(&py).arg(&script).arg(rdir).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    eprintln!("{out}");
}
