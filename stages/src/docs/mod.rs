//! `docs`: folder READMEs generated from the published runs, so docs never drift.
//!
//! Two kinds of instance (see `plan::docs_instances`), told apart by `params.kind`:
//!
//! - `pair`: `<layout root>/<pair dir>/README.md` — which runs exist, what the sizes mean,
//!   the exact commands that rebuild them, prerequisites, and how stable the ranking is
//!   across calibration sizes (Spearman ρ and top-10 overlap between every two runs of the
//!   same granularity). Deps: the runs' manifests, in `params.runs` order.
//! - `model`: `<layout root>/README.md` — the pairs, the sizes, the layout, the commands.
//!   No deps: everything comes from the parameters.
//!
//! Parameters hold only workspace-relative paths and no timestamps, so the READMEs (and
//! their keys) are the same on every machine.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::io::pyjson::format_f;
use crate::stats;
use qpipe_contract::{DepSpec, Instance, Job, OutSpec, Stage};

/// The `docs` stage.
pub struct Docs;

/// The `docs` instance of a pair folder: deps `manifest` (one per run, in `doc.runs`'
/// order), out `readme` (`README.md` in the folder).
pub fn pair_instance(doc: PairDoc, manifests: Vec<PathBuf>) -> Result<Instance> {
    let path = doc.path.clone();
    let n = manifests.len();
    Ok(Instance {
        id: format!("docs@{path}"),
        kind: "docs".into(),
        params: serde_json::to_value(DocsParams::Pair(doc))?,
        locators: serde_json::json!({}),
        deps: manifests.into_iter().map(|m| DepSpec::new("manifest", m)).collect(),
        outs: vec![OutSpec::tracked("readme", PathBuf::from(&path).join("README.md"))],
        description: format!("README for {path} ({n} runs)"),
    })
}

/// The `docs` instance of a model's `layer-analysis/` folder: no deps, out `readme`.
pub fn model_instance(doc: ModelDoc) -> Result<Instance> {
    let path = doc.path.clone();
    Ok(Instance {
        id: format!("docs@{path}"),
        kind: "docs".into(),
        params: serde_json::to_value(DocsParams::Model(doc))?,
        locators: serde_json::json!({}),
        deps: vec![],
        outs: vec![OutSpec::tracked("readme", PathBuf::from(&path).join("README.md"))],
        description: format!("README for {path}"),
    })
}

impl Stage for Docs {
    fn kind(&self) -> &'static str {
        "docs"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_DOCS")
    }
    fn run(&self, job: &Job<'_>) -> Result<()> {
        let params: DocsParams = serde_json::from_value(job.params.clone())
            .with_context(|| format!("`{}`: docs parameters do not match the docs stage's schema", job.id))?;
        let out = job.out("readme")?;
        let text = match &params {
            DocsParams::Pair(p) => {
                let manifests = job.deps_named("manifest");
                if manifests.len() != p.runs.len() {
                    bail!("`{}`: {} runs but {} manifests in deps", job.id, p.runs.len(), manifests.len());
                }
                let mut sens = Vec::new();
                for dep in manifests {
                    let m = crate::io::pyjson::read(dep)?;
                    sens.push(sensitivities(&m).with_context(|| format!("manifest `{}`", dep.display()))?);
                }
                pair_readme(p, &sens)
            }
            DocsParams::Model(m) => model_readme(m),
        };
        std::fs::write(out, text).with_context(|| format!("could not write `{}`", out.display()))
    }
}

/// The docs stage's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DocsParams {
    Pair(PairDoc),
    Model(ModelDoc),
}

/// Where the model comes from, for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The `model` group option, e.g. `tiny_qwen3_vl`.
    pub name: String,
    /// A workspace-relative checkpoint folder (absent for hub models and absolute paths).
    pub path: Option<String>,
    pub repo: Option<String>,
    pub revision: Option<String>,
}

/// One calibration size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeInfo {
    pub name: String,
    pub samples: usize,
}

/// How runs are calibrated and scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibInfo {
    pub captions_path: String,
    pub seq_len: usize,
    /// Every size the dataset defines, fewest samples first.
    pub sizes: Vec<SizeInfo>,
    pub method: String,
    pub batch_size: usize,
    pub score_size: usize,
    pub effective_bits: f64,
    pub device: String,
}

/// The quant pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairInfo {
    /// The `quant_pair` option, e.g. `wfp8_afp16`.
    pub name: String,
    /// The folder, e.g. `weight-fp8-act-fp16`.
    pub dir: String,
    pub weight: String,
    pub activation: String,
    pub format_name: String,
    pub experimental: bool,
    pub scheme: String,
}

/// One published run of a pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDoc {
    pub size: String,
    pub samples: usize,
    pub granularity: String,
    /// The run folder, workspace-relative.
    pub path: String,
    /// The run folder relative to the pair folder (for links).
    pub rel: String,
}

/// `pair` README parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairDoc {
    /// The pair folder, workspace-relative.
    pub path: String,
    pub pipeline_file: String,
    pub model: ModelInfo,
    pub calib: CalibInfo,
    pub pair: PairInfo,
    /// Sorted by granularity, then samples.
    pub runs: Vec<RunDoc>,
    /// `qpipe build` arguments in override form that rebuild every run of the pair.
    pub overrides: Vec<String>,
}

/// One pair, as the model README lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairSummary {
    pub pair: PairInfo,
    pub granularities: Vec<String>,
    pub sizes: Vec<String>,
    pub overrides: Vec<String>,
}

/// `model` README parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDoc {
    /// The layout root, workspace-relative (`models/<model>/layer-analysis`).
    pub path: String,
    pub pipeline_file: String,
    pub model: ModelInfo,
    pub calib: CalibInfo,
    pub pairs: Vec<PairSummary>,
    /// The recipes across pairs under this folder (absent when there are none, so that a
    /// model without recipes keeps its key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipes: Vec<RecipeSummary>,
}

/// One `recipe` folder as the model README lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecipeSummary {
    /// Relative to the model's folder: `recipes/small`.
    pub dir: String,
    pub size: String,
    pub granularity: String,
    pub pairs: Vec<String>,
    pub budgets: Vec<f64>,
}

/// (recipe, importance) in manifest order.
pub fn sensitivities(manifest: &Value) -> Result<Vec<(String, f64)>> {
    let ls = manifest
        .get("layer_sensitivity")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("key `layer_sensitivity` is missing or not an object"))?;
    ls.iter()
        .map(|(k, v)| {
            let x = v.get("importance").and_then(Value::as_f64);
            x.map(|x| (k.clone(), x)).ok_or_else(|| anyhow!("key `layer_sensitivity.{k}.importance` is not a number"))
        })
        .collect()
}

const GENERATED: &str = "<!-- Generated by `qpipe build` (the docs stage) from pipeline.yaml and the runs' manifests. \
Do not edit: change pipeline.yaml or the docs stage, then rebuild. -->";

fn model_source(m: &ModelInfo) -> String {
    match (&m.path, &m.repo, &m.revision) {
        (Some(p), _, _) => format!("local checkpoint `{p}`"),
        (None, Some(r), Some(rev)) => format!("hub model `{r}` at revision `{rev}`"),
        (None, Some(r), None) => format!("hub model `{r}`"),
        _ => "a checkpoint folder outside the workspace, given with `model.path`".to_string(),
    }
}

fn prerequisites(s: &mut String, m: &ModelInfo, c: &CalibInfo) {
    let _ = writeln!(s, "## Prerequisites\n");
    let _ =
        writeln!(s, "- The `qpipe` binary (`cargo install --path .` in the repository, or `cargo run --release --`).");
    match (&m.path, &m.repo) {
        (Some(p), _) => {
            let _ = writeln!(s, "- The checkpoint folder `{p}` in the workspace (no download).");
        }
        (None, Some(r)) => {
            let _ = writeln!(
                s,
                "- The checkpoint `{r}`{}: `qpipe build` fetches it into the Hugging Face cache (set `HF_TOKEN` if \
                 the model is gated), or point at a local copy with `model.path=/path/to/checkpoint`.",
                m.revision.as_deref().map(|r| format!(" (revision `{r}`)")).unwrap_or_default()
            );
        }
        _ => {
            let _ = writeln!(s, "- The checkpoint folder given with `model.path=`.");
        }
    }
    let _ = writeln!(s, "- The calibration captions `{}` (committed; one caption per line).", c.captions_path);
    let _ = writeln!(
        s,
        "- A device: `autoquant.device={}`. This qpipe build scores on the CPU (`auto` = `cpu`); GPU scoring is \
         not built yet, so a model at full size is slow. The embedded tiny model runs on a CPU in seconds.",
        c.device
    );
    let _ = writeln!(s, "- No Python: scoring is qpipe's own (ModelOpt `auto_quantize` semantics).\n");
}

fn sizes_paragraph(s: &mut String, c: &CalibInfo) {
    let _ = writeln!(s, "| Size | Calibration samples |\n|---|---|");
    for z in &c.sizes {
        let _ = writeln!(s, "| {} | {} |", z.name, z.samples);
    }
    let _ = writeln!(
        s,
        "\nA run of size *N samples* calibrates on the first N captions of `{}`, tokenized with the checkpoint's \
         tokenizer to {} tokens (left padding, truncation). Scoring: method `{}`, batch size {}, score size {} \
         (score steps = min({} / {}, batches)), search constraint {} effective bits.\n",
        c.captions_path,
        c.seq_len,
        c.method,
        c.batch_size,
        c.score_size,
        c.score_size,
        c.batch_size,
        crate::io::pyjson::repr_f64(c.effective_bits)
    );
}

fn pair_title(p: &PairInfo) -> String {
    format!("weight {}, activation {}", p.weight.to_uppercase(), p.activation.to_uppercase())
}

fn granularity_label(g: &str) -> String {
    if g == "default" {
        String::new()
    } else {
        format!(" ({g})")
    }
}

/// The pair folder's README. `sens[i]` are the sensitivities of `p.runs[i]`.
pub fn pair_readme(p: &PairDoc, sens: &[Vec<(String, f64)>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {}: {}\n", p.pair.dir, pair_title(&p.pair));
    let _ = writeln!(s, "{GENERATED}\n");
    let _ = writeln!(
        s,
        "Per-layer quantization sensitivity of the language model of `{}` ({}) with weights in **{}** and \
         activations in **{}** (format `{}`, scheme `{}`).{}\n",
        p.model.name,
        model_source(&p.model),
        p.pair.weight,
        p.pair.activation,
        p.pair.format_name,
        p.pair.scheme,
        if p.pair.experimental {
            " This pair is **experimental**: its format is not one of ModelOpt's stock configurations."
        } else {
            ""
        }
    );
    let _ = writeln!(s, "## Runs\n");
    let _ = writeln!(s, "| Run | Samples | Folder | Report | Figure |\n|---|---|---|---|---|");
    for r in &p.runs {
        let _ = writeln!(
            s,
            "| {}{} | {} | [`{}/`]({}/) | [per-layer-sensitivity.md]({}/per-layer-sensitivity.md) | \
             [heatmap]({}/per-layer-sensitivity.svg) |",
            r.size,
            granularity_label(&r.granularity),
            r.samples,
            r.rel,
            r.rel,
            r.rel,
            r.rel
        );
    }
    let _ = writeln!(
        s,
        "\nEach run folder holds `{}_quant_manifest.json` (the legacy manifest), `per-layer-sensitivity.json` / \
         `.md` / `.svg` (the report and its heatmap) and `{}_autoquant_state.json` (the raw search state; its \
         `.pt` twin is git-ignored).\n",
        p.pair.scheme, p.pair.scheme
    );
    let _ = writeln!(s, "### Calibration sizes\n");
    sizes_paragraph(&mut s, &p.calib);

    let _ = writeln!(s, "## Ranking stability across calibration sizes\n");
    let mut rows = Vec::new();
    for i in 0..p.runs.len() {
        for j in i + 1..p.runs.len() {
            let (a, b) = (&p.runs[i], &p.runs[j]);
            if a.granularity != b.granularity {
                continue;
            }
            let (x, y) = stats::paired(&sens[i], &sens[j]);
            let rho = stats::spearman(&x, &y).map_or("n/a".to_string(), |r| format_f(r, 4));
            let k = 10.min(x.len());
            // Top-10 among the layers both runs score, so the fraction is out of `k`.
            let shared = |a: &[(String, f64)], b: &[(String, f64)]| -> Vec<(String, f64)> {
                let names: std::collections::HashSet<&str> = b.iter().map(|(k, _)| k.as_str()).collect();
                a.iter().filter(|(k, _)| names.contains(k.as_str())).cloned().collect()
            };
            let overlap = stats::top_k_overlap(&shared(&sens[i], &sens[j]), &shared(&sens[j], &sens[i]), 10);
            rows.push(format!(
                "| {} vs {}{} | {} | {}/{} | {} |",
                a.size,
                b.size,
                granularity_label(&a.granularity),
                rho,
                overlap,
                k,
                x.len()
            ));
        }
    }
    if rows.is_empty() {
        let _ = writeln!(s, "Only one calibration size is published for this pair, so there is nothing to compare.\n");
    } else {
        let _ = writeln!(s, "| Runs | Spearman ρ | Top-10 overlap | Layers compared |\n|---|---|---|---|");
        for r in rows {
            let _ = writeln!(s, "{r}");
        }
        let _ = writeln!(
            s,
            "\nSpearman ρ: rank correlation of the per-layer sensitivities (the manifests' `importance`) over the \
             layers both runs score; 1 means the same order. Top-10 overlap: how many of the 10 most sensitive \
             layers the two runs share.\n"
        );
    }

    let _ = writeln!(s, "## Regenerate\n\n```sh");
    let _ = writeln!(s, "qpipe build {}    # every run of this pair", p.path);
    let _ = writeln!(s, "qpipe build {}    # the same, Hydra style", p.overrides.join(" "));
    for r in &p.runs {
        let _ = writeln!(s, "qpipe build {}    # the {} run only", r.path, r.size);
    }
    let _ = writeln!(s, "qpipe status {}    # what is stale, and which input changed", p.path);
    let _ = writeln!(s, "qpipe verify --parity {}    # rebuild into tmp/ and compare with these files", p.pair.dir);
    let _ = writeln!(s, "```\n");
    let _ = writeln!(
        s,
        "Runs are defined in `{}`; a run is rebuilt only when its parameters, its inputs or the code of a stage \
         it depends on change.\n",
        p.pipeline_file
    );
    prerequisites(&mut s, &p.model, &p.calib);
    s.truncate(s.trim_end().len());
    s.push('\n');
    s
}

/// The model's `layer-analysis/README.md`.
pub fn model_readme(m: &ModelDoc) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Layer analysis: {}\n", m.model.name);
    let _ = writeln!(s, "{GENERATED}\n");
    let _ = writeln!(
        s,
        "Per-layer quantization sensitivity analyses (ModelOpt `auto_quantize` semantics) of the language model \
         of `{}` ({}). One folder per (weight, activation) pair, one run folder per calibration size.\n",
        m.model.name,
        model_source(&m.model)
    );
    let _ = writeln!(s, "## Pairs\n");
    let _ = writeln!(s, "| Pair | Weight | Activation | Format | Runs | Status |\n|---|---|---|---|---|---|");
    for p in &m.pairs {
        let runs = if p.granularities.iter().all(|g| g == "default") {
            p.sizes.join(", ")
        } else {
            format!("{} × granularity {}", p.sizes.join(", "), p.granularities.join(", "))
        };
        let _ = writeln!(
            s,
            "| [{}]({}/README.md) | {} | {} | `{}` | {} | {} |",
            p.pair.dir,
            p.pair.dir,
            p.pair.weight,
            p.pair.activation,
            p.pair.format_name,
            runs,
            if p.pair.experimental { "experimental" } else { "stock ModelOpt format" }
        );
    }
    if !m.recipes.is_empty() {
        let _ = writeln!(s, "\n## Mixed-precision recipes across pairs\n");
        let _ = writeln!(
            s,
            "One precision per layer for each bit budget, chosen exactly from the pairs' scores, with ModelOpt and \
             llm-compressor exports and the prediction checked on held-out captions.\n"
        );
        let _ = writeln!(s, "| Recipes | Size | Granularity | Pairs | Budgets (bits) |\n|---|---|---|---|---|");
        for r in &m.recipes {
            let budgets: Vec<String> = r.budgets.iter().map(|b| b.to_string()).collect();
            let _ = writeln!(
                s,
                "| [{}]({}/README.md) | {} | {} | {} | {} |",
                r.dir,
                r.dir,
                r.size,
                r.granularity,
                r.pairs.join(", "),
                budgets.join(", ")
            );
        }
    }
    let _ = writeln!(s, "\n## Calibration sizes\n");
    sizes_paragraph(&mut s, &m.calib);
    let _ = writeln!(s, "## Layout\n\n```text");
    let _ = writeln!(s, "{}/", m.path);
    let _ = writeln!(s, "  README.md                              this file");
    let _ = writeln!(s, "  weight-<w>-act-<a>/README.md           runs, ranking stability, commands");
    let _ = writeln!(s, "  weight-<w>-act-<a>/<run>/");
    let _ = writeln!(s, "    <scheme>_quant_manifest.json         the manifest (legacy schema)");
    let _ = writeln!(s, "    per-layer-sensitivity.json|md|svg     the report and its heatmap");
    let _ = writeln!(s, "    <scheme>_autoquant_state.json        the raw search state");
    let _ = writeln!(s, "    <scheme>_autoquant_state.pt          the same, for torch.load (git-ignored)");
    if !m.recipes.is_empty() {
        let _ = writeln!(s, "  recipes/<size>[/<granularity>]/      recipe.json, pareto.json|svg, exports, README.md");
    }
    let _ = writeln!(s, "```\n");
    let _ = writeln!(s, "## Regenerate\n\n```sh");
    let _ = writeln!(s, "qpipe build    # every published run (the `publish` matrix of {})", m.pipeline_file);
    let _ = writeln!(s, "qpipe build {}    # everything under this folder", m.path);
    for p in &m.pairs {
        let _ = writeln!(s, "qpipe build {}    # one pair, Hydra style", p.overrides.join(" "));
    }
    let _ = writeln!(s, "qpipe status    # what is stale, and which input changed");
    let _ = writeln!(
        s,
        "qpipe verify --parity <pair dir>    # e.g. {}",
        m.pairs.first().map_or("weight-int8-act-int8", |p| p.pair.dir.as_str())
    );
    let _ = writeln!(s, "qpipe clean    # drop the git-ignored .pt intermediates; the next build does no scoring");
    let _ = writeln!(s, "```\n");
    prerequisites(&mut s, &m.model, &m.calib);
    s.truncate(s.trim_end().len());
    s.push('\n');
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::aggregate::build_manifest;
    use crate::aggregate::tests::{scheme, synthetic_state};
    use qpipe_contract::JobFile;
    use serde_json::json;

    pub(crate) fn calib() -> CalibInfo {
        CalibInfo {
            captions_path: "data/calibration/captions.txt".into(),
            seq_len: 512,
            sizes: vec![
                SizeInfo { name: "small".into(), samples: 16 },
                SizeInfo { name: "medium".into(), samples: 128 },
                SizeInfo { name: "large".into(), samples: 512 },
            ],
            method: "gradient".into(),
            batch_size: 8,
            score_size: 128,
            effective_bits: 8.0,
            device: "auto".into(),
        }
    }

    pub(crate) fn pair_doc() -> PairDoc {
        let root = "models/tiny/layer-analysis/weight-fp8-act-fp16";
        PairDoc {
            path: root.into(),
            pipeline_file: "pipeline.yaml".into(),
            model: ModelInfo {
                name: "tiny".into(),
                path: Some("models/tiny/checkpoint".into()),
                repo: None,
                revision: None,
            },
            calib: calib(),
            pair: PairInfo {
                name: "wfp8_afp16".into(),
                dir: "weight-fp8-act-fp16".into(),
                weight: "fp8".into(),
                activation: "fp16".into(),
                format_name: "FP8_WEIGHT_ONLY_CFG".into(),
                experimental: false,
                scheme: "wfp8_afp16_autoquant_lm".into(),
            },
            runs: ["small", "medium", "large"]
                .iter()
                .zip([16, 128, 512])
                .map(|(z, n)| RunDoc {
                    size: z.to_string(),
                    samples: n,
                    granularity: "default".into(),
                    path: format!("{root}/tiny_autoquant_wfp8_afp16_lm_{z}"),
                    rel: format!("tiny_autoquant_wfp8_afp16_lm_{z}"),
                })
                .collect(),
            overrides: vec![
                "model=tiny".into(),
                "quant_pair=wfp8_afp16".into(),
                "dataset.size=small,medium,large".into(),
            ],
        }
    }

    #[test]
    fn pair_readme_lists_runs_commands_and_stability() {
        let m = build_manifest(&synthetic_state(3, "FP8"), &scheme(), &json!({"id": "m"})).unwrap();
        let a = sensitivities(&m).unwrap();
        let b = pair_doc_b(&a); // two layers trade sensitivities
        let text = pair_readme(&pair_doc(), &[a.clone(), a.clone(), b]);
        assert!(
            text.contains(
                "| small | 16 | [`tiny_autoquant_wfp8_afp16_lm_small/`](tiny_autoquant_wfp8_afp16_lm_small/)"
            ),
            "{text}"
        );
        assert!(text.contains("| small vs medium | 1.0000 | 10/10 | 12 |"), "{text}");
        let rho = stats::spearman_by_name(&a, &pair_doc_b(&a)).unwrap();
        assert!(rho < 1.0);
        assert!(text.contains(&format!("| small vs large | {} |", format_f(rho, 4))), "{text}");
        assert!(text.contains("qpipe build model=tiny quant_pair=wfp8_afp16 dataset.size=small,medium,large"));
        assert!(text.contains("qpipe build models/tiny/layer-analysis/weight-fp8-act-fp16    # every run"));
        assert!(text.contains("qpipe verify --parity weight-fp8-act-fp16"));
        assert!(text.contains("| medium | 128 |") && text.contains("| large | 512 |"));
        assert!(!text.contains("/tmp") && !text.contains("/home"));
        assert!(text.ends_with("\n") && !text.ends_with("\n\n"));
    }

    fn pair_doc_b(a: &[(String, f64)]) -> Vec<(String, f64)> {
        let mut b = a.to_vec();
        let (v0, v1) = (b[0].1, b[1].1);
        b[0].1 = v1;
        b[1].1 = v0;
        b
    }

    #[test]
    fn params_round_trip_and_model_readme_links_pairs() {
        let p = DocsParams::Pair(pair_doc());
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["kind"], json!("pair"));
        assert_eq!(serde_json::from_value::<DocsParams>(v).unwrap(), p);
        let d = pair_doc();
        let m = ModelDoc {
            path: "models/tiny/layer-analysis".into(),
            pipeline_file: "pipeline.yaml".into(),
            model: d.model.clone(),
            calib: calib(),
            pairs: vec![PairSummary {
                pair: d.pair.clone(),
                granularities: vec!["default".into()],
                sizes: vec!["small".into(), "medium".into(), "large".into()],
                overrides: d.overrides.clone(),
            }],
            recipes: vec![],
        };
        let text = model_readme(&m);
        assert!(text.contains("| [weight-fp8-act-fp16](weight-fp8-act-fp16/README.md) | fp8 | fp16 | `FP8_WEIGHT_ONLY_CFG` | small, medium, large |"), "{text}");
        assert!(text.contains("| small | 16 |"));
        assert!(text.contains("qpipe clean"));
        assert!(!text.contains("recipes") && serde_json::to_value(&m).unwrap().get("recipes").is_none());
        let with = ModelDoc {
            recipes: vec![RecipeSummary {
                dir: "recipes/small".into(),
                size: "small".into(),
                granularity: "default".into(),
                pairs: vec!["wint8_aint8".into(), "wfp4_afp16".into()],
                budgets: vec![4.5, 8.0],
            }],
            ..m
        };
        let text = model_readme(&with);
        assert!(
            text.contains(
                "| [recipes/small](recipes/small/README.md) | small | default | wint8_aint8, wfp4_afp16 | 4.5, 8 |"
            ),
            "{text}"
        );
    }

    #[test]
    fn stage_reads_the_manifests_and_writes_the_readme() {
        let dir = tempfile::tempdir().unwrap();
        let mut deps = Vec::new();
        for (i, n) in [2usize, 3, 4].iter().enumerate() {
            let m = build_manifest(&synthetic_state(*n, "FP8"), &scheme(), &json!({"id": "m"})).unwrap();
            let p = dir.path().join(format!("m{i}.json"));
            crate::io::pyjson::write(&p, &m).unwrap();
            deps.push(JobFile::new("manifest", p));
        }
        let params = serde_json::to_value(DocsParams::Pair(pair_doc())).unwrap();
        let outs = [JobFile::new("readme", dir.path().join("README.md.tmp"))];
        let job = Job {
            id: "docs@x",
            root: dir.path(),
            params: &params,
            locators: &json!({}),
            deps: &deps,
            outs: &outs,
            final_outs: &[JobFile::new("readme", "README.md")],
            progress: &qpipe_contract::Silent,
        };
        Docs.run(&job).unwrap();
        let text = std::fs::read_to_string(&outs[0].path).unwrap();
        // small (2 layers = 8 recipes) vs medium (3 layers = 12): 8 shared recipes.
        assert!(text.contains("| small vs medium | 1.0000 | 8/8 | 8 |"), "{text}");
        let e = format!("{:#}", Docs.run(&Job { deps: &deps[..2], ..job }).unwrap_err());
        assert!(e.contains("3 runs but 2 manifests"), "{e}");
    }
}
