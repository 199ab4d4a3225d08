//! `aggregate`: AutoQuant state → `<scheme>_quant_manifest.json` (legacy schema).
//!
//! The manifest has exactly the legacy keys, in the legacy order:
//!
//! | key | value |
//! |---|---|
//! | `scheme` | the `scheme` parameter, verbatim |
//! | `model` | the `model` parameter (`{"id": ...}`) |
//! | `num_quantized_layers` | `len(layers)` |
//! | `layers` | `{module: {"quantized": true, "module_type": "QuantLinear"}}`, in model order |
//! | `autoquant_state` | `{"keys", "constraints", "score", "is_satisfied"}` |
//! | `layer_sensitivity` | per `<module>.quant_recipe`, in the search's order: `formats`, `scores`, `costs`, `importance`, `rank` |
//! | `sensitivity_ranking` | `[{"name", "importance"}]`, least sensitive first |
//!
//! Rules read off the legacy files (and checked against them in the tests):
//! - `importance` is the score of the recipe's quantized format (the first format that is
//!   not `NONE(...)`; ModelOpt lists `[<quantized>, NONE]`, and `NONE` scores 0).
//! - `rank` is the 1-based position in a *stable* ascending sort by importance (ties keep
//!   the search's order), and `sensitivity_ranking` lists the recipes in that order.
//! - `autoquant_state.keys` are ModelOpt's state keys present in the state
//!   (`candidate_stats`, `best`, `constraints`); `constraints` (the achieved values), `score`
//!   and `is_satisfied` come from `best`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::io::pyjson;
use qpipe_contract::{DepSpec, Instance, Job, OutSpec, Stage};

/// The `aggregate` stage.
pub struct Aggregate;

/// The `aggregate` instance of the run `run_id`: dep `state_json` (the score stage's JSON
/// state), out `manifest`. `scheme` is the manifest's scheme block, `model_id` what it
/// calls the model.
pub fn instance(run_id: &str, scheme: Value, model_id: &str, state_json: &Path, manifest: &Path) -> Instance {
    Instance {
        id: format!("aggregate@{run_id}"),
        kind: "aggregate".into(),
        params: json!({"scheme": scheme, "model": {"id": model_id}}),
        locators: json!({}),
        deps: vec![DepSpec::new("state_json", state_json)],
        outs: vec![OutSpec::tracked("manifest", manifest)],
        description: format!("manifest for {run_id}"),
    }
}

impl Stage for Aggregate {
    fn kind(&self) -> &'static str {
        "aggregate"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_AGGREGATE")
    }
    fn run(&self, job: &Job<'_>) -> Result<()> {
        let state_path = job.dep("state_json")?;
        let out = job.out("manifest")?;
        let state = pyjson::read(state_path)?;
        let scheme = job.params.get("scheme").ok_or_else(|| anyhow!("`{}`: params lack `scheme`", job.id))?;
        let model = job.params.get("model").ok_or_else(|| anyhow!("`{}`: params lack `model`", job.id))?;
        let manifest = build_manifest(&state, scheme, model)
            .with_context(|| format!("could not aggregate AutoQuant state `{}`", state_path.display()))?;
        pyjson::write(out, &manifest)
    }
}

/// ModelOpt's AutoQuant searcher state keys, in the order it stores them.
const MODELOPT_STATE_KEYS: [&str; 3] = ["candidate_stats", "best", "constraints"];

/// `NONE(effective-bits: 16.0)` and the like: the "leave unquantized" choice.
pub fn is_none_format(format: &str) -> bool {
    format == "NONE" || format.starts_with("NONE(")
}

/// The effective bits ModelOpt prints in a format's name: `X(effective-bits: 8.0)` → 8.0.
pub fn effective_bits(format: &str) -> Option<f64> {
    let rest = &format[format.find("effective-bits:")? + "effective-bits:".len()..];
    rest.trim_start().split(|c: char| c == ')' || c.is_whitespace()).next()?.parse().ok()
}

/// One recipe of the search, as the state and the manifest record it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// `<module>.quant_recipe`.
    pub name: String,
    pub formats: Vec<String>,
    pub scores: Vec<f64>,
    pub costs: Vec<f64>,
}

impl Recipe {
    /// Parse `{"formats": [...], "scores": [...], "costs": [...]}` (state or manifest).
    pub fn from_value(name: &str, v: &Value) -> Result<Self> {
        let list = |key: &str| -> Result<&Vec<Value>> {
            v.get(key).and_then(Value::as_array).ok_or_else(|| anyhow!("recipe `{name}`: key `{key}` is not a list"))
        };
        let floats = |key: &str| -> Result<Vec<f64>> {
            list(key)?
                .iter()
                .map(|x| x.as_f64().ok_or_else(|| anyhow!("recipe `{name}`: `{key}` holds a non-number `{x}`")))
                .collect()
        };
        let formats = list("formats")?
            .iter()
            .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| anyhow!("recipe `{name}`: non-string format `{x}`")))
            .collect::<Result<Vec<_>>>()?;
        let (scores, costs) = (floats("scores")?, floats("costs")?);
        if scores.len() != formats.len() || costs.len() != formats.len() {
            bail!(
                "recipe `{name}`: {} formats but {} scores and {} costs; the state is inconsistent, re-run `score`",
                formats.len(),
                scores.len(),
                costs.len()
            );
        }
        Ok(Self { name: name.to_owned(), formats, scores, costs })
    }

    /// Index of the quantized format: the first that is not `NONE`.
    pub fn quantized_index(&self) -> Result<usize> {
        self.formats
            .iter()
            .position(|f| !is_none_format(f))
            .ok_or_else(|| anyhow!("recipe `{}`: has no quantized format (formats: {:?})", self.name, self.formats))
    }

    /// The quantized format's score: the recipe's sensitivity.
    pub fn importance(&self) -> Result<f64> {
        let s = self.scores[self.quantized_index()?];
        if s.is_nan() {
            bail!("recipe `{}`: the score is NaN; the scorer diverged — check the calibration data", self.name);
        }
        Ok(s)
    }
}

/// 1-based ranks by a stable ascending sort of `importance` (ties keep input order),
/// and the order itself: `order[r - 1]` is the index of the recipe ranked `r`.
pub fn rank_ascending(importance: &[f64]) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..importance.len()).collect();
    order.sort_by(|&a, &b| importance[a].total_cmp(&importance[b]));
    let mut rank = vec![0; importance.len()];
    for (pos, &i) in order.iter().enumerate() {
        rank[i] = pos + 1;
    }
    (rank, order)
}

fn key<'a>(v: &'a Value, k: &str) -> Result<&'a Value> {
    v.get(k).ok_or_else(|| anyhow!("key `{k}` is missing"))
}

/// State JSON (see the PREAMBLE schema) + the scheme and model parameters → manifest.
pub fn build_manifest(state: &Value, scheme: &Value, model: &Value) -> Result<Value> {
    let layers: Vec<&str> = key(state, "quantized_layers")?
        .as_array()
        .ok_or_else(|| anyhow!("key `quantized_layers` is not a list"))?
        .iter()
        .map(|v| v.as_str().ok_or_else(|| anyhow!("key `quantized_layers`: `{v}` is not a module name")))
        .collect::<Result<_>>()?;
    let stats =
        key(state, "candidate_stats")?.as_object().ok_or_else(|| anyhow!("key `candidate_stats` is not an object"))?;
    let recipes: Vec<Recipe> = stats
        .iter()
        .map(|(name, v)| Recipe::from_value(name, v).context("key `candidate_stats`"))
        .collect::<Result<_>>()?;
    let importance: Vec<f64> = recipes.iter().map(Recipe::importance).collect::<Result<_>>()?;
    let (rank, order) = rank_ascending(&importance);

    let best = key(state, "best")?;
    // The search's outcome (`best.constraints`: the achieved values, what the report
    // calls "Effective bits (from search)"), else the requested constraints.
    let constraints = best
        .get("constraints")
        .or_else(|| state.get("constraints"))
        .ok_or_else(|| anyhow!("key `best.constraints` is missing (and there is no top-level `constraints`)"))?;
    let score = key(best, "score").context("in key `best`")?;
    let is_satisfied = key(best, "is_satisfied").context("in key `best`")?;
    let keys: Vec<&str> = MODELOPT_STATE_KEYS.into_iter().filter(|k| state.get(*k).is_some()).collect();

    let mut layer_map = Map::new();
    for name in &layers {
        layer_map.insert((*name).to_owned(), json!({"quantized": true, "module_type": "QuantLinear"}));
    }
    let mut sens = Map::new();
    for (i, r) in recipes.iter().enumerate() {
        sens.insert(
            r.name.clone(),
            json!({
                "formats": r.formats,
                "scores": r.scores,
                "costs": r.costs,
                "importance": importance[i],
                "rank": rank[i],
            }),
        );
    }
    let ranking: Vec<Value> =
        order.iter().map(|&i| json!({"name": recipes[i].name, "importance": importance[i]})).collect();
    Ok(json!({
        "scheme": scheme,
        "model": model,
        "num_quantized_layers": layers.len(),
        "layers": layer_map,
        "autoquant_state": {
            "keys": keys,
            "constraints": constraints,
            "score": as_float(score).context("key `best.score`")?,
            "is_satisfied": is_satisfied,
        },
        "layer_sensitivity": sens,
        "sensitivity_ranking": ranking,
    }))
}

/// Python writes a float score as a float even when it is integral (`0.0`).
fn as_float(v: &Value) -> Result<Value> {
    let f = v.as_f64().ok_or_else(|| anyhow!("`{v}` is not a number"))?;
    Ok(json!(f))
}

/// Read a manifest written by [`Aggregate`] (or by the legacy tools) and its recipes.
pub fn read_recipes(manifest: &Value) -> Result<Vec<Recipe>> {
    key(manifest, "layer_sensitivity")?
        .as_object()
        .ok_or_else(|| anyhow!("key `layer_sensitivity` is not an object"))?
        .iter()
        .map(|(name, v)| Recipe::from_value(name, v).context("key `layer_sensitivity`"))
        .collect()
}

/// Convenience for tests and tools: aggregate a state file into a manifest file.
pub fn aggregate_file(state: &Path, scheme: &Value, model: &Value, out: &Path) -> Result<()> {
    let manifest = build_manifest(&pyjson::read(state)?, scheme, model)
        .with_context(|| format!("could not aggregate AutoQuant state `{}`", state.display()))?;
    pyjson::write(out, &manifest)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small state shaped like score's output: `n_layers` decoder layers, four recipes each.
    pub(crate) fn synthetic_state(n_layers: usize, fmt: &str) -> Value {
        let mut quantized = Vec::new();
        let mut stats = Map::new();
        let mut recipe = Map::new();
        for l in 0..n_layers {
            let groups: [(&str, &[&str], f64); 4] = [
                ("self_attn.q_proj", &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], 96.0),
                ("self_attn.o_proj", &["self_attn.o_proj"], 64.0),
                ("mlp.gate_proj", &["mlp.gate_proj", "mlp.up_proj"], 256.0),
                ("mlp.down_proj", &["mlp.down_proj"], 128.0),
            ];
            for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                quantized.push(format!("layers.{l}.self_attn.{m}"));
            }
            for m in ["gate_proj", "up_proj", "down_proj"] {
                quantized.push(format!("layers.{l}.mlp.{m}"));
            }
            for (g, (head, members, elems)) in groups.iter().enumerate() {
                // Distinct, deterministic, spread over decades; two zero ties in layer 0.
                let score = if l == 0 && g >= 2 { 0.0 } else { 10f64.powi(-(((l * 4 + g) % 9) as i32)) * 1.7 };
                let name = format!("layers.{l}.{head}.quant_recipe");
                stats.insert(
                    name.clone(),
                    json!({
                        "formats": [format!("{fmt}(effective-bits: 8.0)"), "NONE(effective-bits: 16.0)"],
                        "scores": [score, 0.0],
                        "costs": [elems * 8.0 / 16.0 * 1024.0, elems * 1024.0],
                        "module_names": members.iter().map(|m| format!("layers.{l}.{m}")).collect::<Vec<_>>(),
                    }),
                );
                recipe.insert(name, json!(format!("{fmt}(effective-bits: 8.0)")));
            }
        }
        json!({
            "format": "qpipe.autoquant_state/1",
            "method": "gradient", "batch_size": 8, "num_calib_steps": 2, "num_score_steps": 2,
            "device": "cpu", "dtype": "f32",
            "quantized_layers": quantized,
            "candidate_stats": stats,
            "best": {"recipe": recipe, "constraints": {"effective_bits": 8.0}, "score": 0.27, "is_satisfied": true},
            "constraints": {"effective_bits": 8.0},
        })
    }

    pub(crate) fn scheme() -> Value {
        json!({"name": "wfp8_afp16_autoquant_lm", "auto_quantize_bits": 8.0, "auto_quantize_method": "gradient",
               "auto_quantize_score_size": 128, "coverage_mode": "lm_only", "coverage_fraction": 1.0,
               "quant_formats": ["FP8_WEIGHT_ONLY_CFG"]})
    }

    #[test]
    fn manifest_has_the_legacy_keys_ranks_and_order() {
        let m = build_manifest(&synthetic_state(3, "FP8"), &scheme(), &json!({"id": "m"})).unwrap();
        let keys: Vec<_> = m.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "scheme",
                "model",
                "num_quantized_layers",
                "layers",
                "autoquant_state",
                "layer_sensitivity",
                "sensitivity_ranking"
            ]
        );
        assert_eq!(m["num_quantized_layers"], json!(21));
        assert_eq!(m["layers"]["layers.0.self_attn.k_proj"], json!({"quantized": true, "module_type": "QuantLinear"}));
        assert_eq!(
            m["autoquant_state"],
            json!({"keys": ["candidate_stats", "best", "constraints"], "constraints": {"effective_bits": 8.0},
                   "score": 0.27, "is_satisfied": true})
        );
        let ls = m["layer_sensitivity"].as_object().unwrap();
        assert_eq!(ls.keys().next().unwrap(), "layers.0.self_attn.q_proj.quant_recipe");
        // Ties at zero keep the search's order: gate (index 2) before down (index 3).
        assert_eq!(ls["layers.0.mlp.gate_proj.quant_recipe"]["rank"], json!(1));
        assert_eq!(ls["layers.0.mlp.down_proj.quant_recipe"]["rank"], json!(2));
        let ranking = m["sensitivity_ranking"].as_array().unwrap();
        assert_eq!(ranking.len(), 12);
        for (pos, entry) in ranking.iter().enumerate() {
            let name = entry["name"].as_str().unwrap();
            assert_eq!(ls[name]["rank"], json!(pos + 1));
            assert_eq!(ls[name]["importance"], entry["importance"]);
            assert_eq!(ls[name]["importance"], ls[name]["scores"][0]);
        }
        let imps: Vec<f64> = ranking.iter().map(|e| e["importance"].as_f64().unwrap()).collect();
        assert!(imps.windows(2).all(|w| w[0] <= w[1]), "{imps:?}");
    }

    #[test]
    fn constraints_are_the_searchs_outcome() {
        let mut s = synthetic_state(1, "FP8");
        s["best"]["constraints"] = json!({"effective_bits": 7.5});
        let m = build_manifest(&s, &scheme(), &json!({})).unwrap();
        assert_eq!(m["autoquant_state"]["constraints"], json!({"effective_bits": 7.5}));
        s["best"].as_object_mut().unwrap().remove("constraints");
        let m = build_manifest(&s, &scheme(), &json!({})).unwrap();
        assert_eq!(m["autoquant_state"]["constraints"], json!({"effective_bits": 8.0}));
    }

    #[test]
    fn bad_states_are_named() {
        let mut s = synthetic_state(1, "FP8");
        s["candidate_stats"]["layers.0.mlp.down_proj.quant_recipe"]["scores"] = json!([1.0]);
        let e = format!("{:#}", build_manifest(&s, &scheme(), &json!({})).unwrap_err());
        assert!(e.contains("layers.0.mlp.down_proj.quant_recipe") && e.contains("1 scores"), "{e}");
        let mut s = synthetic_state(1, "FP8");
        s.as_object_mut().unwrap().remove("best");
        let e = format!("{:#}", build_manifest(&s, &scheme(), &json!({})).unwrap_err());
        assert!(e.contains("`best`"), "{e}");
    }

    #[test]
    fn effective_bits_parse() {
        assert_eq!(effective_bits("CUSTOM_0(effective-bits: 8.0)"), Some(8.0));
        assert_eq!(effective_bits("W4A8_NVFP4_FP8_CFG(effective-bits: 4.0)"), Some(4.0));
        assert_eq!(effective_bits("INT8"), None);
        assert!(is_none_format("NONE(effective-bits: 16.0)"));
    }

    /// Rebuild each legacy manifest from a state reconstructed out of it: the bytes match.
    #[test]
    fn legacy_manifests_regenerate_byte_for_byte() {
        let Some(legacy) = crate::parity::legacy_dir() else { return };
        let mut checked = 0;
        for path in crate::parity::files_named(&legacy, "_quant_manifest.json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let m: Value = serde_json::from_str(&text).unwrap();
            let mut stats = Map::new();
            for (name, r) in m["layer_sensitivity"].as_object().unwrap() {
                stats.insert(
                    name.clone(),
                    json!({"formats": r["formats"], "scores": r["scores"], "costs": r["costs"], "module_names": []}),
                );
            }
            let a = &m["autoquant_state"];
            let state = json!({
                "format": "qpipe.autoquant_state/1",
                "quantized_layers": m["layers"].as_object().unwrap().keys().collect::<Vec<_>>(),
                "candidate_stats": stats,
                "best": {"recipe": {}, "constraints": a["constraints"], "score": a["score"],
                         "is_satisfied": a["is_satisfied"]},
                "constraints": a["constraints"],
            });
            let ours = build_manifest(&state, &m["scheme"], &m["model"]).unwrap();
            assert!(pyjson::dumps(&ours) == text, "{} does not regenerate byte for byte", path.display());
            checked += 1;
        }
        assert!(checked >= 7, "found only {checked} legacy manifests under {}", legacy.display());
    }
}
