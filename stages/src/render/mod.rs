//! `render`: manifest → `per-layer-sensitivity.json`, `.md` and `.svg`.
//!
//! The JSON and Markdown follow the legacy files exactly (keys, column names, sort order,
//! number formatting); the SVG heatmap is new and is linked from the Markdown. All three
//! are made from one list of [`Row`]s, so the Markdown's numbers always equal the JSON's.
//!
//! A row per recipe of the manifest's `layer_sensitivity`: `layer` is the recipe name
//! without `.quant_recipe`, `num_bits` the quantized format's effective bits,
//! `sensitivity` its `importance`, `size_cost` the quantized format's cost. Rows are sorted
//! by sensitivity, descending, stable (ties keep the manifest's order), as the legacy tool's
//! `sorted(..., reverse=True)` did.

pub mod markdown;
pub mod svg;

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

use crate::aggregate::{effective_bits, read_recipes};
use crate::io::pyjson;
use qpipe_contract::{DepSpec, Instance, Job, OutSpec, Stage};

/// The `render` stage.
pub struct Render;

/// The file names of the outs `json`, `markdown` and `svg`.
pub const OUT_NAMES: [&str; 3] =
    ["per-layer-sensitivity.json", "per-layer-sensitivity.md", "per-layer-sensitivity.svg"];

/// The `render` instance of the run `run_id`: dep `manifest`, outs `json`, `markdown`
/// and `svg` ([`OUT_NAMES`] in `run_dir`).
pub fn instance(run_id: &str, manifest: &Path, run_dir: &Path) -> Instance {
    let out = |name: &str, file: &str| OutSpec::tracked(name, run_dir.join(file));
    Instance {
        id: format!("render@{run_id}"),
        kind: "render".into(),
        params: json!({}),
        locators: json!({}),
        deps: vec![DepSpec::new("manifest", manifest)],
        outs: vec![out("json", OUT_NAMES[0]), out("markdown", OUT_NAMES[1]), out("svg", OUT_NAMES[2])],
        description: format!("report for {run_id}"),
    }
}

impl Stage for Render {
    fn kind(&self) -> &'static str {
        "render"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_RENDER")
    }
    fn run(&self, job: &Job<'_>) -> Result<()> {
        let manifest_path = job.dep("manifest")?;
        let manifest = pyjson::read(manifest_path)?;
        let report = Report::from_manifest(&manifest)
            .with_context(|| format!("could not read manifest `{}`", manifest_path.display()))?;
        let svg_name = job
            .final_out("svg")?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| OUT_NAMES[2].to_string());
        pyjson::write(job.out("json")?, &report.to_json())?;
        write(job.out("markdown")?, &markdown::render(&report, Some(&svg_name)))?;
        write(job.out("svg")?, &svg::render(&report))
    }
}

fn write(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("could not write `{}`", path.display()))
}

/// One line of the per-layer table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub layer: String,
    pub num_bits: f64,
    pub sensitivity: f64,
    pub size_cost: f64,
}

/// What the three outputs are made from.
#[derive(Debug, Clone)]
pub struct Report {
    pub scheme: Value,
    pub model: Value,
    pub autoquant_state: Value,
    /// Sorted by sensitivity, descending.
    pub rows: Vec<Row>,
}

fn get<'a>(v: &'a Value, k: &str) -> Result<&'a Value> {
    v.get(k).ok_or_else(|| anyhow!("key `{k}` is missing"))
}

impl Report {
    pub fn from_manifest(manifest: &Value) -> Result<Self> {
        let sens = get(manifest, "layer_sensitivity")?;
        let mut rows = Vec::new();
        for r in read_recipes(manifest)? {
            let q = r.quantized_index()?;
            let importance = get(&sens[&r.name], "importance")
                .and_then(|v| v.as_f64().ok_or_else(|| anyhow!("`{v}` is not a number")))
                .with_context(|| format!("key `layer_sensitivity.{}.importance`", r.name))?;
            // ModelOpt's cost is elements × bits / 16, so NONE's cost gives the bits too.
            let none_cost = r.formats.iter().position(|f| crate::aggregate::is_none_format(f)).map(|i| r.costs[i]);
            let num_bits = effective_bits(&r.formats[q])
                .or_else(|| none_cost.filter(|c| *c > 0.0).map(|c| 16.0 * r.costs[q] / c))
                .ok_or_else(|| anyhow!("recipe `{}`: cannot tell the bits of format `{}`", r.name, r.formats[q]))?;
            let layer = r.name.strip_suffix(".quant_recipe").unwrap_or(&r.name).to_string();
            rows.push(Row { layer, num_bits, sensitivity: importance, size_cost: r.costs[q] });
        }
        rows.sort_by(|a, b| b.sensitivity.total_cmp(&a.sensitivity));
        Ok(Self {
            scheme: get(manifest, "scheme")?.clone(),
            model: get(manifest, "model")?.clone(),
            autoquant_state: get(manifest, "autoquant_state")?.clone(),
            rows,
        })
    }

    /// `per-layer-sensitivity.json`.
    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| json!({"layer": r.layer, "num_bits": r.num_bits, "sensitivity": r.sensitivity, "size_cost": r.size_cost}))
            .collect();
        json!({
            "scheme": self.scheme,
            "model": self.model,
            "autoquant_state": self.autoquant_state,
            "layer_sensitivity": rows,
        })
    }

    pub fn scheme_name(&self) -> &str {
        self.scheme.get("name").and_then(Value::as_str).unwrap_or("unknown")
    }

    pub fn model_id(&self) -> &str {
        self.model.get("id").and_then(Value::as_str).unwrap_or("unknown")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::build_manifest;
    use crate::aggregate::tests::{scheme, synthetic_state};
    use qpipe_contract::JobFile;

    #[test]
    fn rows_are_sorted_descending_and_stable() {
        let m = build_manifest(&synthetic_state(2, "FP8"), &scheme(), &json!({"id": "m"})).unwrap();
        let r = Report::from_manifest(&m).unwrap();
        assert_eq!(r.rows.len(), 8);
        assert!(r.rows.windows(2).all(|w| w[0].sensitivity >= w[1].sensitivity));
        // The two zero ties of layer 0 keep the manifest's order: gate before down.
        let tail: Vec<_> = r.rows[6..].iter().map(|r| r.layer.as_str()).collect();
        assert_eq!(tail, ["layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"]);
        assert_eq!(r.rows[0].num_bits, 8.0);
        let j = r.to_json();
        assert_eq!(
            j.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["scheme", "model", "autoquant_state", "layer_sensitivity"]
        );
        assert_eq!(
            j["layer_sensitivity"][0].as_object().unwrap().keys().collect::<Vec<_>>(),
            ["layer", "num_bits", "sensitivity", "size_cost"]
        );
    }

    #[test]
    fn bits_fall_back_to_the_cost_ratio() {
        let mut m = build_manifest(&synthetic_state(1, "FP8"), &scheme(), &json!({"id": "m"})).unwrap();
        for v in m["layer_sensitivity"].as_object_mut().unwrap().values_mut() {
            v["formats"] = json!(["CUSTOM_0", "NONE"]);
        }
        let r = Report::from_manifest(&m).unwrap();
        assert!(r.rows.iter().all(|r| r.num_bits == 8.0));
    }

    #[test]
    fn stage_writes_all_three_files() {
        let dir = tempfile::tempdir().unwrap();
        let m = build_manifest(&synthetic_state(3, "FP8"), &scheme(), &json!({"id": "m"})).unwrap();
        let mp = dir.path().join("x_quant_manifest.json");
        pyjson::write(&mp, &m).unwrap();
        let names = ["json", "markdown", "svg"];
        let outs: Vec<_> =
            names.iter().zip(OUT_NAMES).map(|(k, n)| JobFile::new(*k, dir.path().join(format!("{n}.tmp")))).collect();
        let finals: Vec<_> = names.iter().zip(OUT_NAMES).map(|(k, n)| JobFile::new(*k, n)).collect();
        let job = Job {
            id: "render@x",
            root: dir.path(),
            params: &json!({}),
            locators: &json!({}),
            deps: &[JobFile::new("manifest", mp)],
            outs: &outs,
            final_outs: &finals,
            progress: &qpipe_contract::Silent,
        };
        Render.run(&job).unwrap();
        let md = std::fs::read_to_string(&outs[1].path).unwrap();
        assert!(md.contains("](per-layer-sensitivity.svg)"), "{md}");
        let svg = std::fs::read_to_string(&outs[2].path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let j = pyjson::read(&outs[0].path).unwrap();
        assert_eq!(j["layer_sensitivity"].as_array().unwrap().len(), 12);
    }

    /// Rebuild the legacy JSON and Markdown from the legacy manifests: the JSON matches byte
    /// for byte, and the Markdown does once the (new) figure link is taken out.
    #[test]
    fn legacy_reports_regenerate_from_their_manifests() {
        let Some(legacy) = crate::parity::legacy_dir() else { return };
        let mut checked = 0;
        for path in crate::parity::files_named(&legacy, "_quant_manifest.json") {
            let dir = path.parent().unwrap();
            let report = Report::from_manifest(&pyjson::read(&path).unwrap()).unwrap();
            let want_json = std::fs::read_to_string(dir.join(OUT_NAMES[0])).unwrap();
            assert!(pyjson::dumps(&report.to_json()) == want_json, "{}: JSON differs", dir.display());
            let want_md = std::fs::read_to_string(dir.join(OUT_NAMES[1])).unwrap();
            let ours = markdown::render(&report, None);
            for (i, (a, b)) in ours.lines().zip(want_md.lines()).enumerate() {
                assert_eq!(a, b, "{}: Markdown line {} differs", dir.display(), i + 1);
            }
            assert_eq!(ours, want_md, "{}: Markdown differs", dir.display());
            let with_fig = markdown::render(&report, Some("f.svg"));
            assert_eq!(markdown::strip_figure(&with_fig), want_md);
            checked += 1;
        }
        assert!(checked >= 7);
    }
}
