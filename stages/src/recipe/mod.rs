//! `recipe`: a mixed-precision recipe across pairs, from the pairs' saved scores (never
//! re-scoring).
//!
//! One instance per model × calibration size × method × granularity (its pairs: every
//! pair planned for it, or `recipe.pairs`). For each budget in `recipe.budgets` it chooses
//! one pair's format or NONE per recipe group (q/k/v together, gate/up together, as the
//! scores group them) minimizing the summed score under ModelOpt's weight-size cost model —
//! exactly ([`solve`]) — and writes, under `<layout root>/recipes/<size>[/<granularity>]/`:
//!
//! - `recipe.json`: per budget the asked and achieved bits, the predicted (summed) score,
//!   `is_satisfied`, each group's pair (or `NONE`), and what the recipe did on held-out
//!   captions (loss increase and KL, [`validate`]), plus the rank correlation of predicted
//!   and measured over the validated points;
//! - `pareto.json` / `pareto.svg`: summed score against achieved bits every 0.125 bit from
//!   the lowest reachable to 16, the budgets marked, and predicted against measured;
//! - `modelopt_<b>bits.json` and `llm_compressor_<b>bits.yaml` per budget ([`export`]);
//! - `README.md`.

pub mod export;
pub mod solve;
mod svg;
pub mod validate;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::io::pyjson;
use crate::score::backend::ScoreFormat;
use crate::score::{adapters, FormatParams, Method};
use qpipe_contract::{DepSpec, Instance, Job, OutSpec, Stage};

/// The `recipe` stage.
pub struct RecipeStage;

/// One pair of a recipe: its name (`wint8_aint8`) and the format its scores were made with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipePair {
    pub name: String,
    pub format: FormatParams,
}

/// `recipe` parameters (its key, with its inputs' hashes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipeParams {
    pub model_id: String,
    pub size: String,
    pub granularity: String,
    pub method: Method,
    pub pairs: Vec<RecipePair>,
    pub budgets: Vec<f64>,
    /// Validation: batch size, and how many Pareto points beside the budgets to measure.
    pub batch_size: usize,
    pub validate_points: usize,
    pub device: String,
    pub dtype: String,
}

/// The files of a `recipe` instance.
pub struct RecipeFiles<'a> {
    pub identity: &'a Path,
    pub calib: &'a Path,
    pub holdout: &'a Path,
    pub checkpoint: Option<&'a Path>,
    /// Per pair (in `RecipeParams::pairs` order), its scores file.
    pub scores: Vec<PathBuf>,
    /// The output folder.
    pub dir: &'a Path,
}

/// `4.5` → `4.5bits`, `5` → `5bits`: how a budget names its export files.
pub fn budget_tag(bits: f64) -> String {
    format!("{}bits", qpipe_quant::spec::format_bits(bits))
}

/// The export files of one budget: (ModelOpt config, llm-compressor recipe).
pub fn export_names(bits: f64) -> (String, String) {
    let t = budget_tag(bits);
    (format!("modelopt_{t}.json"), format!("llm_compressor_{t}.yaml"))
}

pub fn instance(id: String, params: &RecipeParams, files: &RecipeFiles<'_>, locators: Value) -> Result<Instance> {
    ensure!(
        params.pairs.len() == files.scores.len(),
        "internal error: {} pairs, {} scores",
        params.pairs.len(),
        files.scores.len()
    );
    let mut deps = vec![
        DepSpec::new("identity", files.identity),
        DepSpec::new("calib", files.calib),
        DepSpec::new("holdout", files.holdout),
    ];
    deps.extend(files.checkpoint.map(|p| DepSpec::new("checkpoint", p)));
    for (p, s) in params.pairs.iter().zip(&files.scores) {
        deps.push(DepSpec::new(format!("scores_{}", p.name), s));
    }
    let d = files.dir;
    let mut outs = vec![
        OutSpec::tracked("recipe", d.join("recipe.json")),
        OutSpec::tracked("pareto", d.join("pareto.json")),
        OutSpec::tracked("pareto_svg", d.join("pareto.svg")),
        OutSpec::tracked("readme", d.join("README.md")),
    ];
    for &b in &params.budgets {
        let (mo, lc) = export_names(b);
        outs.push(OutSpec::tracked(format!("modelopt_{}", budget_tag(b)), d.join(mo)));
        outs.push(OutSpec::tracked(format!("llm_compressor_{}", budget_tag(b)), d.join(lc)));
    }
    let names: Vec<&str> = params.pairs.iter().map(|p| p.name.as_str()).collect();
    Ok(Instance {
        id,
        kind: "recipe".into(),
        params: serde_json::to_value(params)?,
        locators,
        deps,
        outs,
        description: format!(
            "mixed-precision recipe over {} ({} pairs, {})",
            names.join(", "),
            names.len(),
            params.size
        ),
    })
}

/// One recipe group across the pairs.
#[derive(Debug, Clone)]
pub struct Group {
    /// The group's name without `.quant_recipe`.
    pub name: String,
    pub modules: Vec<String>,
    /// `(score, cost)` per pair, then NONE's last.
    pub options: solve::Options,
}

/// The groups of the pairs' score files (all must list the same groups, members and
/// weight counts); errors name the file and the group.
pub fn groups(pairs: &[RecipePair], scores: &[(PathBuf, Value)]) -> Result<Vec<Group>> {
    let stats = |(path, v): &(PathBuf, Value)| -> Result<Map<String, Value>> {
        if v.get("format").and_then(Value::as_str) != Some(crate::search::SCORES_FORMAT) {
            bail!("{}: not a `{}` file", path.display(), crate::search::SCORES_FORMAT);
        }
        v.get("candidate_stats")
            .and_then(Value::as_object)
            .cloned()
            .with_context(|| format!("{}: no `candidate_stats`", path.display()))
    };
    let tables: Vec<Map<String, Value>> = scores.iter().map(stats).collect::<Result<_>>()?;
    let Some(first) = tables.first() else { bail!("a recipe needs at least one pair") };
    let mut out = Vec::new();
    for (name, v0) in first {
        let modules: Vec<String> = serde_json::from_value(v0["module_names"].clone())
            .with_context(|| format!("{}: group `{name}` has no `module_names`", scores[0].0.display()))?;
        let none_cost = v0["costs"].as_array().and_then(|c| c.last()).and_then(Value::as_f64);
        let mut options = Vec::new();
        for ((pair, t), (path, _)) in pairs.iter().zip(&tables).zip(scores) {
            let e =
                t.get(name).with_context(|| format!("{}: no group `{name}` (pair `{}`)", path.display(), pair.name))?;
            let num = |k: &str, i: usize| e[k].get(i).and_then(Value::as_f64);
            let (Some(s), Some(c)) = (num("scores", 0), num("costs", 0)) else {
                bail!("{}: group `{name}` has no score and cost for its format", path.display());
            };
            ensure!(
                e["module_names"] == v0["module_names"] && e["costs"].as_array().and_then(|c| c.last()).and_then(Value::as_f64) == none_cost,
                "{}: group `{name}` has other members or weight count than in {}; were the pairs scored on one checkpoint?",
                path.display(),
                scores[0].0.display()
            );
            options.push((s, c));
        }
        let none = none_cost.with_context(|| format!("{}: group `{name}` has no NONE cost", scores[0].0.display()))?;
        options.push((0.0, none));
        out.push(Group { name: name.strip_suffix(".quant_recipe").unwrap_or(name).to_string(), modules, options });
    }
    for (t, (path, _)) in tables.iter().zip(scores) {
        ensure!(
            t.len() == out.len(),
            "{}: {} groups, {} has {}",
            path.display(),
            t.len(),
            scores[0].0.display(),
            out.len()
        );
    }
    Ok(out)
}

/// A solution as the outputs show it.
struct Pick<'a> {
    point: &'a solve::Point,
    asked: f64,
    satisfied: bool,
}

impl Stage for RecipeStage {
    fn kind(&self) -> &'static str {
        "recipe"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_RECIPE")
    }
    fn exclusive(&self) -> bool {
        true
    }
    fn run(&self, job: &Job<'_>) -> Result<()> {
        let p: RecipeParams = serde_json::from_value(job.params.clone()).context("reading the `recipe` parameters")?;
        let progress = job.progress;
        let scores: Vec<(PathBuf, Value)> = p
            .pairs
            .iter()
            .map(|pair| {
                let path = job.dep(&format!("scores_{}", pair.name))?.to_path_buf();
                Ok((path.clone(), pyjson::read(&path)?))
            })
            .collect::<Result<_>>()?;
        let groups = groups(&p.pairs, &scores)?;
        let options: Vec<solve::Options> = groups.iter().map(|g| g.options.clone()).collect();
        let none = p.pairs.len();
        let total: f64 = groups.iter().map(|g| g.options[none].1).sum();
        ensure!(total > 0.0, "the groups have no weights");
        let front = solve::front(&options);
        let bits_of = |cost: f64| cost / total * 16.0;
        let pick = |asked: f64| -> Pick<'_> {
            match solve::best_within(&front, total * asked / 16.0) {
                Some(point) => Pick { point, asked, satisfied: true },
                None => Pick { point: &front[0], asked, satisfied: false },
            }
        };
        let budgets: Vec<Pick<'_>> = p.budgets.iter().map(|&b| pick(b)).collect();
        // The sweep: every 0.125 bit from the lowest reachable to 16.
        let lowest = (bits_of(front[0].cost) * 8.0).ceil() / 8.0;
        let sweep: Vec<Pick<'_>> =
            (0..).map(|k| lowest + k as f64 * 0.125).take_while(|&b| b <= 16.0 + 1e-9).map(pick).collect();

        // Validation: the budgets' recipes and up to `validate_points` distinct sweep points.
        fn add<'p>(pt: &'p solve::Point, v: &mut Vec<&'p solve::Point>) {
            if !v.iter().any(|q| std::ptr::eq(*q, pt)) {
                v.push(pt);
            }
        }
        let mut distinct: Vec<&solve::Point> = Vec::new();
        for s in &sweep {
            add(s.point, &mut distinct);
        }
        let mut validated: Vec<&solve::Point> = Vec::new();
        let k = p.validate_points.min(distinct.len());
        for i in 0..k {
            let idx = if k <= 1 { 0 } else { i * (distinct.len() - 1) / (k - 1) };
            add(distinct[idx], &mut validated);
        }
        for b in &budgets {
            add(b.point, &mut validated);
        }
        let choices: Vec<validate::Choice> =
            validated.iter().map(|pt| pt.choice.iter().map(|&o| (o < none).then_some(o)).collect()).collect();
        let compute = qpipe_compute::device::resolve(&p.device, &p.dtype)?;
        let device = qpipe_compute::device::candle_device(&compute.device)?;
        let dtype = qpipe_compute::device::candle_dtype(&compute.dtype)?;
        let ckpt = adapters::checkpoint_dir(job)?;
        progress.note(&format!("recipe: loading {} to validate {} recipes", ckpt.display(), choices.len()));
        let model = adapters::load_model_on(&ckpt, dtype, &device)?;
        let formats: Vec<Box<dyn ScoreFormat>> =
            p.pairs.iter().map(|pr| adapters::load_format(&pr.format)).collect::<Result<_>>()?;
        let refs: Vec<&dyn ScoreFormat> = formats.iter().map(|f| f.as_ref()).collect();
        let calib = adapters::load_batches(job.dep("calib")?, p.batch_size)?;
        let holdout = adapters::load_batches(job.dep("holdout")?, p.batch_size)?;
        let members: Vec<Vec<String>> = groups.iter().map(|g| g.modules.clone()).collect();
        let (base_loss, measured) =
            validate::measure(model.as_ref(), &refs, &members, &choices, &calib, &holdout, progress)?;
        let measured_of = |pt: &solve::Point| validated.iter().position(|q| std::ptr::eq(*q, pt)).map(|i| measured[i]);
        let predicted: Vec<f64> = validated.iter().map(|pt| pt.score).collect();
        let loss: Vec<f64> = measured.iter().map(|m| m.loss_increase).collect();
        let kl: Vec<f64> = measured.iter().map(|m| m.kl).collect();
        let rho_loss = crate::stats::spearman(&predicted, &loss);
        let rho_kl = crate::stats::spearman(&predicted, &kl);

        // Outputs.
        let pair_name = |o: usize| if o < none { p.pairs[o].name.clone() } else { "NONE".to_string() };
        let cfgs: Vec<qpipe_quant::QuantConfig> = p
            .pairs
            .iter()
            .map(|pr| {
                let o = match &pr.format.quant_cfg_overrides {
                    Value::Object(m) => m.clone(),
                    _ => Map::new(),
                };
                qpipe_quant::config_for(&pr.format.name, &o)
            })
            .collect::<Result<_>>()?;
        let mut budget_docs = Vec::new();
        for b in &budgets {
            let layers: Map<String, Value> = groups
                .iter()
                .zip(&b.point.choice)
                .map(|(g, &o)| (g.name.clone(), Value::String(pair_name(o))))
                .collect();
            let m = measured_of(b.point).expect("budgets are validated");
            budget_docs.push(json!({
                "effective_bits": b.asked,
                "achieved_bits": bits_of(b.point.cost),
                "predicted_score": b.point.score,
                "is_satisfied": b.satisfied,
                "validation": {"loss_increase": m.loss_increase, "kl_div": m.kl},
                "exports": {"modelopt": export_names(b.asked).0, "llm_compressor": export_names(b.asked).1},
                "layers": layers,
            }));
            let choice: Vec<export::LayerChoice<'_>> = groups
                .iter()
                .zip(&b.point.choice)
                .map(|(g, &o)| export::LayerChoice {
                    group: &g.name,
                    modules: &g.modules,
                    format: (o < none).then(|| (p.pairs[o].name.as_str(), &cfgs[o])),
                })
                .collect();
            let (mo, lc) = export_names(b.asked);
            write(
                job.out(&format!("modelopt_{}", budget_tag(b.asked)))?,
                &(serde_json::to_string_pretty(&export::modelopt_config(&choice))? + "\n"),
            )
            .with_context(|| format!("writing {mo}"))?;
            let lcr = export::llm_compressor_recipe(&choice);
            let mut yaml = lcr.yaml;
            if !lcr.unsupported.is_empty() {
                budget_docs.last_mut().expect("pushed above")["llm_compressor_unsupported"] = json!(lcr
                    .unsupported
                    .iter()
                    .map(|u| json!({"group": u.group, "modules": u.modules, "pair": u.pair, "format": u.format, "why": u.why}))
                    .collect::<Vec<_>>());
                yaml.push_str("# Not expressible in this scheme (left unquantized here; see recipe.json):\n");
                for u in &lcr.unsupported {
                    yaml.push_str(&format!("#   {} ({}): {} — {}\n", u.group, u.pair, u.format, u.why));
                }
            }
            write(job.out(&format!("llm_compressor_{}", budget_tag(b.asked)))?, &yaml)
                .with_context(|| format!("writing {lc}"))?;
        }
        let validated_doc: Vec<Value> = validated
            .iter()
            .zip(&measured)
            .map(|(pt, m)| json!({"achieved_bits": bits_of(pt.cost), "predicted_score": pt.score, "loss_increase": m.loss_increase, "kl_div": m.kl}))
            .collect();
        let recipe = json!({
            "format": "qpipe.recipe/1",
            "model": p.model_id,
            "calibration_size": p.size,
            "granularity": p.granularity,
            "method": p.method.as_str(),
            "pairs": p.pairs.iter().map(|pr| json!({"name": pr.name, "format": pr.format.name})).collect::<Vec<_>>(),
            "groups": groups.len(),
            "weights_16bit_cost": total,
            "budgets": budget_docs,
            "validation": {
                "held_out_loss": base_loss,
                "points": validated_doc,
                "spearman_predicted_vs_loss_increase": rho_loss,
                "spearman_predicted_vs_kl_div": rho_kl,
            },
        });
        write(job.out("recipe")?, &(serde_json::to_string_pretty(&recipe)? + "\n"))?;
        let sweep_doc: Vec<Value> = sweep
            .iter()
            .map(|s| json!({"effective_bits": s.asked, "achieved_bits": bits_of(s.point.cost), "score": s.point.score}))
            .collect();
        let pareto = json!({
            "format": "qpipe.recipe_pareto/1",
            "front_points": front.len(),
            "sweep": sweep_doc,
        });
        write(job.out("pareto")?, &(serde_json::to_string_pretty(&pareto)? + "\n"))?;
        let plot = svg::Plot {
            sweep: sweep.iter().map(|s| (bits_of(s.point.cost), s.point.score)).collect(),
            budgets: budgets.iter().map(|b| (b.asked, bits_of(b.point.cost), b.point.score)).collect(),
            validated: validated.iter().zip(&measured).map(|(pt, m)| (pt.score, m.loss_increase, m.kl)).collect(),
        };
        write(job.out("pareto_svg")?, &plot.render())?;
        write(job.out("readme")?, &readme(&p, &recipe))?;
        Ok(())
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The generated README of a recipe folder.
fn readme(p: &RecipeParams, recipe: &Value) -> String {
    let pairs: Vec<&str> = p.pairs.iter().map(|x| x.name.as_str()).collect();
    let mut s = format!(
        "# Mixed-precision recipes: {} ({} calibration, {})\n\n\
         Generated by qpipe's `recipe` stage from the per-layer scores of {} pairs ({}), method `{}`, \
         granularity `{}`. Each budget's recipe is the exact minimum of the summed score under ModelOpt's \
         weight-size cost (one pair's format or NONE per recipe group). `recipe.json` lists every group's \
         choice; `pareto.json` / `pareto.svg` the front; the exports load with ModelOpt \
         (`mtq.quantize(model, json.load(...), forward_loop)`) and llm-compressor (`oneshot(..., recipe=...)`).\n\n\
         | budget (bits) | achieved | predicted score | held-out loss increase | KL per token | ModelOpt | llm-compressor |\n\
         |---|---|---|---|---|---|---|\n",
        p.model_id,
        p.size,
        p.granularity,
        pairs.len(),
        pairs.join(", "),
        p.method.as_str(),
        p.granularity
    );
    for b in recipe["budgets"].as_array().into_iter().flatten() {
        let f = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
        s.push_str(&format!(
            "| {} | {:.3}{} | {:.4e} | {:.4e} | {:.4e} | [{}]({}) | [{}]({}) |\n",
            f("effective_bits"),
            f("achieved_bits"),
            if b["is_satisfied"] == true { "" } else { " (not met)" },
            f("predicted_score"),
            b["validation"]["loss_increase"].as_f64().unwrap_or(f64::NAN),
            b["validation"]["kl_div"].as_f64().unwrap_or(f64::NAN),
            b["exports"]["modelopt"].as_str().unwrap_or(""),
            b["exports"]["modelopt"].as_str().unwrap_or(""),
            b["exports"]["llm_compressor"].as_str().unwrap_or(""),
            b["exports"]["llm_compressor"].as_str().unwrap_or(""),
        ));
    }
    let v = &recipe["validation"];
    let rho = |k: &str| v[k].as_f64().map_or("n/a".to_string(), |r| format!("{r:.3}"));
    s.push_str(&format!(
        "\nPrediction check on held-out captions (not used for calibration; unquantized loss {:.4}): over {} \
         validated recipes, Spearman ρ(predicted score, loss increase) = {}, ρ(predicted score, KL) = {}.\n\n\
         ![Pareto front](pareto.svg)\n\n\
         Loading the ModelOpt export: JSON writes the `block_sizes` key `-1` as the string `\"-1\"`, \
         which ModelOpt's validator refuses; turn digit keys back into integers first:\n\n\
         ```python\n\
         import json\n\
         import modelopt.torch.quantization as mtq\n\
         def int_keys(o):\n    \
             if isinstance(o, dict):\n        \
                 return {{int(k) if k.lstrip(\"-\").isdigit() else k: int_keys(v) for k, v in o.items()}}\n    \
             return [int_keys(v) for v in o] if isinstance(o, list) else o\n\
         cfg = int_keys(json.load(open(\"modelopt_6.0bits.json\")))\n\
         mtq.quantize(model, cfg, forward_loop)\n\
         ```\n",
        v["held_out_loss"].as_f64().unwrap_or(f64::NAN),
        v["points"].as_array().map_or(0, Vec::len),
        rho("spearman_predicted_vs_loss_increase"),
        rho("spearman_predicted_vs_kl_div"),
    ));
    s
}
