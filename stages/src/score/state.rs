//! The scores `score` writes: the run's facts and `candidate_stats` per recipe (schema
//! `qpipe.autoquant_scores/1`): the AutoQuant state (`qpipe.autoquant_state/1`, see the
//! DESIGN) without what the budget decides, which the `search` stage adds.

use serde_json::{json, Map, Value};

use super::recipes::{none_display, Recipe};

/// Per recipe, what ModelOpt's `initialize_candidate_stats` records.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateStats {
    pub recipe: String,
    pub formats: Vec<String>,
    pub scores: Vec<f64>,
    pub costs: Vec<f64>,
    pub module_names: Vec<String>,
}

/// Candidate stats for one format plus NONE, in ModelOpt's format order (by compression:
/// the format, then NONE, unless the format is not smaller than 16 bits), scores made
/// non-increasing along that order (`score = min(score, prev_score)`, as ModelOpt does).
pub fn candidate_stats(
    recipes: &[Recipe],
    format_display: &str,
    effective_bits: f64,
    scores: &[f64],
) -> Vec<CandidateStats> {
    recipes
        .iter()
        .zip(scores)
        .map(|(r, &s)| {
            let mut choices = vec![(format_display.to_string(), effective_bits, s), (none_display(), 16.0, 0.0)];
            if effective_bits >= 16.0 {
                choices.reverse();
            }
            let mut prev = f64::INFINITY;
            let mut out = CandidateStats {
                recipe: r.name.clone(),
                formats: vec![],
                scores: vec![],
                costs: vec![],
                module_names: r.members.clone(),
            };
            for (f, bits, score) in choices {
                let score = score.min(prev);
                prev = score;
                out.formats.push(f);
                out.scores.push(score);
                out.costs.push(r.cost(bits));
            }
            out
        })
        .collect()
}

/// The run facts recorded beside the numbers.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub method: String,
    pub batch_size: usize,
    pub num_calib_steps: usize,
    pub num_score_steps: usize,
    pub device: String,
    pub dtype: String,
    pub quantized_layers: Vec<String>,
}

/// The scores file (key order as the state's schema lists them).
pub fn to_json(info: &RunInfo, stats: &[CandidateStats]) -> Value {
    let mut cs = Map::new();
    for c in stats {
        cs.insert(
            c.recipe.clone(),
            json!({"formats": c.formats, "scores": c.scores, "costs": c.costs, "module_names": c.module_names}),
        );
    }
    json!({
        "format": "qpipe.autoquant_scores/1",
        "method": info.method,
        "batch_size": info.batch_size,
        "num_calib_steps": info.num_calib_steps,
        "num_score_steps": info.num_score_steps,
        "device": info.device,
        "dtype": info.dtype,
        "quantized_layers": info.quantized_layers,
        "candidate_stats": cs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::recipes::display_name;

    #[test]
    fn state_has_the_schema() {
        let recipes = vec![
            Recipe {
                name: "layers.0.self_attn.q_proj.quant_recipe".into(),
                members: vec!["layers.0.self_attn.q_proj".into()],
                weight_numel: 64,
            },
            Recipe {
                name: "layers.0.self_attn.o_proj.quant_recipe".into(),
                members: vec!["layers.0.self_attn.o_proj".into()],
                weight_numel: 32,
            },
        ];
        let stats = candidate_stats(&recipes, &display_name("FP8_DEFAULT_CFG", 8.0), 8.0, &[0.5, -1e-9]);
        assert_eq!(stats[0].formats, ["FP8_DEFAULT_CFG(effective-bits: 8.0)", "NONE(effective-bits: 16.0)"]);
        assert_eq!(stats[0].costs, [32.0, 64.0]);
        assert_eq!(stats[0].scores, [0.5, 0.0]);
        // ModelOpt's running minimum: a (tiny negative) quantized score carries into NONE.
        assert_eq!(stats[1].scores, [-1e-9, -1e-9]);
        let info = RunInfo {
            method: "gradient".into(),
            batch_size: 8,
            num_calib_steps: 2,
            num_score_steps: 2,
            device: "cpu".into(),
            dtype: "f32".into(),
            quantized_layers: vec!["layers.0.self_attn.q_proj".into(), "layers.0.self_attn.o_proj".into()],
        };
        let v = to_json(&info, &stats);
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys[0], "format");
        assert_eq!(v["format"], "qpipe.autoquant_scores/1");
        assert_eq!(v["candidate_stats"]["layers.0.self_attn.o_proj.quant_recipe"]["costs"], json!([16.0, 32.0]));
        // The search stage completes it into the state.
        let state = crate::search::complete(&v, crate::score::Method::Gradient, 8.0).unwrap();
        assert_eq!(
            state["best"]["recipe"]["layers.0.self_attn.q_proj.quant_recipe"],
            "FP8_DEFAULT_CFG(effective-bits: 8.0)"
        );
        assert_eq!(state["best"]["constraints"]["effective_bits"], 8.0);
        assert_eq!(state["best"]["is_satisfied"], true);
        assert_eq!(state["constraints"]["effective_bits"], 8.0);
    }
}
