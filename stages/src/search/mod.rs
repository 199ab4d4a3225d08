//! `search`: the effective-bits budget applied to saved scores (ModelOpt `auto_quantize`'s
//! search step), apart from the scoring.
//!
//! Reads the `score` stage's per-(recipe, format) scores and costs (dep `scores`, schema
//! `qpipe.autoquant_scores/1`) and writes the legacy AutoQuant state — the same tree plus
//! `best` (the recipe the budget selects, its achieved bits, summed score and whether the
//! budget is met) and `constraints` — as a git-ignored `.pt` (out `state_pt`) and a tracked
//! `.json` (out `state_json`). Its key holds the budget and the method only, so asking
//! "what if my budget were 6 bits" (`autoquant.effective_bits=6`) re-runs this step, the
//! manifest and the renders — milliseconds — and no scoring.
//!
//! [`solve`] holds the search itself: an exact multiple-choice knapsack for `gradient`,
//! ModelOpt's threshold bisection for `kl_div`.

pub mod solve;

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::io::pyjson;
use crate::score::Method;
use qpipe_contract::{DepSpec, Instance, Job, OutSpec, Stage};
use solve::{Candidates, Selection};

/// The `search` stage.
pub struct Search;

/// `search` parameters (the instance key, with the scores' hash).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SearchParams {
    pub method: Method,
    pub effective_bits: f64,
}

/// The schema of the scores file `score` writes.
pub const SCORES_FORMAT: &str = "qpipe.autoquant_scores/1";
/// The schema of the state file this stage writes.
pub const STATE_FORMAT: &str = "qpipe.autoquant_state/1";

/// The `search` instance of the run `run_id`.
pub fn instance(run_id: &str, params: &SearchParams, scores: &Path, state_pt: &Path, state_json: &Path) -> Instance {
    Instance {
        id: format!("search@{run_id}"),
        kind: "search".into(),
        params: serde_json::to_value(params).expect("search params serialize"),
        locators: json!({}),
        deps: vec![DepSpec::new("scores", scores)],
        outs: vec![OutSpec::intermediate("state_pt", state_pt), OutSpec::tracked("state_json", state_json)],
        description: format!("{}-bit search for {run_id}", params.effective_bits),
    }
}

impl Stage for Search {
    fn kind(&self) -> &'static str {
        "search"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_SEARCH")
    }
    fn run(&self, job: &Job<'_>) -> Result<()> {
        let p: SearchParams = serde_json::from_value(job.params.clone()).context("reading the `search` parameters")?;
        let path = job.dep("scores")?;
        let scores = pyjson::read(path)?;
        let state = complete(&scores, p.method, p.effective_bits)
            .with_context(|| format!("searching the scores `{}`", path.display()))?;
        crate::io::torch_pt::write(job.out("state_pt")?, &crate::io::torch_pt::Value::from(&state))
            .context("writing the AutoQuant state `.pt`")?;
        let text = serde_json::to_string_pretty(&state)? + "\n";
        let out = job.out("state_json")?;
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))
    }
}

/// One recipe's candidates as the scores file lists them.
struct Recipe<'a> {
    name: &'a str,
    formats: Vec<&'a str>,
    cands: Candidates,
}

fn recipes(scores: &Value) -> Result<Vec<Recipe<'_>>> {
    if scores.get("format").and_then(Value::as_str) != Some(SCORES_FORMAT) {
        bail!("not a `{SCORES_FORMAT}` file (its `format` is {})", scores.get("format").unwrap_or(&Value::Null));
    }
    let Some(stats) = scores.get("candidate_stats").and_then(Value::as_object) else {
        bail!("no `candidate_stats` mapping");
    };
    let numbers = |v: &Value, what: &str, name: &str| -> Result<Vec<f64>> {
        v.get(what)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .with_context(|| format!("recipe `{name}`: `{what}` is not a list of numbers"))
    };
    stats
        .iter()
        .map(|(name, v)| {
            let formats: Vec<&str> = v
                .get("formats")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_str).collect())
                .with_context(|| format!("recipe `{name}`: `formats` is not a list of names"))?;
            let (scores, costs) = (numbers(v, "scores", name)?, numbers(v, "costs", name)?);
            if scores.len() != formats.len() || costs.len() != formats.len() || formats.is_empty() {
                bail!("recipe `{name}`: {} formats, {} scores, {} costs", formats.len(), scores.len(), costs.len());
            }
            Ok(Recipe { name, formats, cands: Candidates { scores, costs } })
        })
        .collect()
}

/// The AutoQuant state: the scores' tree with `best` and `constraints` for the budget
/// `effective_bits` (`method` picks the search, as ModelOpt's does).
pub fn complete(scores: &Value, method: Method, effective_bits: f64) -> Result<Value> {
    let recipes = recipes(scores)?;
    let cands: Vec<Candidates> = recipes.iter().map(|r| r.cands.clone()).collect();
    // The 16-bit cost of the whole model: each recipe's NONE (its most expensive) choice.
    let total: f64 = cands.iter().map(|c| c.costs.iter().cloned().fold(f64::NEG_INFINITY, f64::max)).sum();
    let max_cost = total * effective_bits / 16.0;
    let sel: Selection = match method {
        Method::Gradient => solve::knapsack(&cands, max_cost)?,
        Method::KlDiv => solve::threshold(&cands, max_cost),
    };
    let mut recipe = Map::new();
    for (r, &i) in recipes.iter().zip(&sel.choice) {
        recipe.insert(r.name.to_string(), Value::String(r.formats[i].to_string()));
    }
    let achieved_bits = if total > 0.0 { sel.cost / total * 16.0 } else { 0.0 };
    let mut state = scores.as_object().cloned().unwrap_or_default();
    state.insert("format".into(), Value::String(STATE_FORMAT.into()));
    state.insert(
        "best".into(),
        json!({
            "recipe": recipe,
            "constraints": {"effective_bits": achieved_bits},
            "score": sel.score,
            "is_satisfied": sel.is_satisfied,
        }),
    );
    state.insert("constraints".into(), json!({ "effective_bits": effective_bits }));
    Ok(Value::Object(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores() -> Value {
        json!({
            "format": SCORES_FORMAT,
            "method": "gradient",
            "candidate_stats": {
                "a.quant_recipe": {"formats": ["F(effective-bits: 8.0)", "NONE(effective-bits: 16.0)"],
                                   "scores": [0.5, 0.0], "costs": [32.0, 64.0], "module_names": ["a"]},
                "b.quant_recipe": {"formats": ["F(effective-bits: 8.0)", "NONE(effective-bits: 16.0)"],
                                   "scores": [0.1, 0.0], "costs": [16.0, 32.0], "module_names": ["b"]},
            },
        })
    }

    #[test]
    fn the_budget_selects_and_the_tree_keeps_its_order() {
        let s = complete(&scores(), Method::Gradient, 8.0).unwrap();
        let keys: Vec<&String> = s.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["format", "method", "candidate_stats", "best", "constraints"]);
        assert_eq!(s["format"], STATE_FORMAT);
        assert_eq!(s["best"]["recipe"]["a.quant_recipe"], "F(effective-bits: 8.0)");
        assert_eq!(s["best"]["constraints"]["effective_bits"], 8.0);
        assert_eq!(s["best"]["is_satisfied"], true);
        // 12 of 16 bits: 72 of 96 units. Quantizing both (score 0.6) fits, and so does
        // quantizing `a` alone (0.5, 64 units): the lower score wins; `b` alone does not fit.
        let s = complete(&scores(), Method::Gradient, 12.0).unwrap();
        assert_eq!(s["best"]["recipe"]["a.quant_recipe"], "F(effective-bits: 8.0)");
        assert_eq!(s["best"]["recipe"]["b.quant_recipe"], "NONE(effective-bits: 16.0)");
        assert_eq!(s["constraints"]["effective_bits"], 12.0);
        let e = complete(&scores(), Method::Gradient, 4.0).unwrap_err().to_string();
        assert!(e.contains("raise `autoquant.effective_bits`"), "{e}");
    }

    #[test]
    fn bad_scores_files_are_named() {
        let e = complete(&json!({"format": "other"}), Method::Gradient, 8.0).unwrap_err().to_string();
        assert!(e.contains(SCORES_FORMAT), "{e}");
        let mut s = scores();
        s["candidate_stats"]["a.quant_recipe"]["costs"] = json!([1.0]);
        let e = complete(&s, Method::Gradient, 8.0).unwrap_err().to_string();
        assert!(e.contains("recipe `a.quant_recipe`: 2 formats, 2 scores, 1 costs"), "{e}");
    }
}
