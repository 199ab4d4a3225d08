//! `qpipe verify --parity`: compare a run folder's artifacts with a reference folder.
//!
//! [`compare`] checks, for a committed run folder and a candidate (a rebuild, or any
//! baseline such as the legacy files):
//!
//! 1. presence of `<scheme>_quant_manifest.json`, `per-layer-sensitivity.json` and
//!    `per-layer-sensitivity.md` on both sides (a missing file is drift; an unreadable
//!    one is an error: the comparison could not be made);
//! 2. schema drift: the key paths of both JSON files, recursively, with their value types
//!    (per-layer maps are compared through their members' keys: `layer_sensitivity.*.rank`);
//! 3. the layer set: recipes only one side has. Recipes past the last block or layer of the
//!    same kind on the other side, when the sides are different models (`model.id`), are a
//!    *model size* difference (the tiny model against the legacy 4B runs), in `notes`.
//!    Vision-tower recipes (`visual.*`) that only
//!    one side lists are a *scope difference* (the legacy INT8 "LM-only" files came from a
//!    full-model scope), reported in `notes`, not drift; so is a different module prefix
//!    (`language_model.layers.0…` vs `layers.0…`);
//! 4. numbers: per layer, the relative difference of the sensitivity (`importance`) is at
//!    most `tol.rel`, and Spearman's ρ over the shared layers is at least
//!    `tol.min_spearman`; the worst layer and the figures go to `figures`;
//! 5. on each side, the Markdown table equals its JSON (same rows, order and printed
//!    numbers) and the JSON equals its manifest; a linked figure exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::io::pyjson::{format_e, repr_f64};
use crate::render::markdown;
use crate::stats;
use qpipe_contract::{ParityReport, Tolerance};

/// The per-run report files, besides the manifest.
pub const REPORT_JSON: &str = "per-layer-sensitivity.json";
pub const REPORT_MD: &str = "per-layer-sensitivity.md";
const MANIFEST_SUFFIX: &str = "_quant_manifest.json";
/// How many drifting layers are listed one by one.
const MAX_LISTED: usize = 10;

/// Compare the artifacts of `candidate` with those of `committed`.
pub fn compare(committed: &Path, candidate: &Path, tol: &Tolerance) -> ParityReport {
    let mut report = ParityReport { run_dir: committed.to_path_buf(), ..Default::default() };
    let a = load_side("committed", committed, &mut report);
    let b = load_side("candidate", candidate, &mut report);
    let (Some(a), Some(b)) = (a, b) else { return report };
    for side in [&a, &b] {
        check_consistency(side, &mut report);
    }
    if let (Some(ma), Some(mb)) = (&a.manifest, &b.manifest) {
        schema_drift("manifest", ma, mb, &["layers", "layer_sensitivity"], &mut report);
        compare_layers(ma, mb, tol, &mut report);
    }
    if let (Some(ja), Some(jb)) = (&a.json, &b.json) {
        schema_drift(REPORT_JSON, ja, jb, &[], &mut report);
    }
    report
}

/// One side's files, parsed. `None` fields are missing files (already reported).
struct Side {
    label: &'static str,
    dir: PathBuf,
    manifest: Option<Value>,
    json: Option<Value>,
    md: Option<String>,
}

fn load_side(label: &'static str, dir: &Path, report: &mut ParityReport) -> Option<Side> {
    if !dir.is_dir() {
        report.errors.push(format!("{label} run folder `{}` does not exist or is not a folder", dir.display()));
        return None;
    }
    let manifests: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            let mut v: Vec<PathBuf> = rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file() && p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(MANIFEST_SUFFIX))
                })
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    let mut side = Side { label, dir: dir.to_path_buf(), manifest: None, json: None, md: None };
    match manifests.as_slice() {
        [] => report.drift.push(format!("{label}: no `*{MANIFEST_SUFFIX}` in `{}`", dir.display())),
        [one] => side.manifest = read_json(one, report),
        many => report.errors.push(format!(
            "{label}: {} manifests in `{}` ({}); keep one per run folder",
            many.len(),
            dir.display(),
            many.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>().join(", ")
        )),
    }
    let json_path = dir.join(REPORT_JSON);
    if json_path.is_file() {
        side.json = read_json(&json_path, report);
    } else {
        report.drift.push(format!("{label}: `{REPORT_JSON}` is missing in `{}`", dir.display()));
    }
    let md_path = dir.join(REPORT_MD);
    if md_path.is_file() {
        match std::fs::read_to_string(&md_path) {
            Ok(t) => side.md = Some(t),
            Err(e) => report.errors.push(format!("could not read `{}`: {e}", md_path.display())),
        }
    } else {
        report.drift.push(format!("{label}: `{REPORT_MD}` is missing in `{}`", dir.display()));
    }
    Some(side)
}

fn read_json(path: &Path, report: &mut ParityReport) -> Option<Value> {
    match crate::io::pyjson::read(path) {
        Ok(v) => Some(v),
        Err(e) => {
            report.errors.push(format!("{e:#}"));
            None
        }
    }
}

// ---- schema ----------------------------------------------------------------------------

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// Key paths → value types. Objects at `maps` (top-level keys) are collections keyed by
/// module: their members are merged under `<key>.*`; list items are merged under `[]`.
pub fn schema(v: &Value, maps: &[&str]) -> BTreeMap<String, BTreeSet<&'static str>> {
    fn walk(v: &Value, path: String, is_map: bool, maps: &[&str], out: &mut BTreeMap<String, BTreeSet<&'static str>>) {
        if !path.is_empty() {
            out.entry(path.clone()).or_default().insert(type_name(v));
        }
        let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
        match v {
            Value::Object(m) if is_map => {
                for item in m.values() {
                    walk(item, join("*"), false, maps, out);
                }
            }
            Value::Object(m) => {
                for (k, item) in m {
                    let child_is_map = path.is_empty() && maps.contains(&k.as_str());
                    walk(item, join(k), child_is_map, maps, out);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, format!("{path}[]"), false, maps, out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(v, String::new(), false, maps, &mut out);
    out
}

fn schema_drift(file: &str, a: &Value, b: &Value, maps: &[&str], report: &mut ParityReport) {
    let (sa, sb) = (schema(a, maps), schema(b, maps));
    for (k, ta) in &sa {
        match sb.get(k) {
            None => {
                report.drift.push(format!("schema drift in `{file}`: key `{k}` is in committed, missing in candidate"))
            }
            Some(tb) if ta != tb => report.drift.push(format!(
                "schema drift in `{file}`: key `{k}` is {} in committed, {} in candidate",
                ta.iter().copied().collect::<Vec<_>>().join("|"),
                tb.iter().copied().collect::<Vec<_>>().join("|")
            )),
            _ => {}
        }
    }
    for k in sb.keys().filter(|k| !sa.contains_key(*k)) {
        report.drift.push(format!("schema drift in `{file}`: key `{k}` is new in candidate (not in committed)"));
    }
}

// ---- layers and numbers ----------------------------------------------------------------

/// A vision-tower module (`visual.blocks.0.attn.qkv`, `model.visual.…`).
pub fn is_vision(name: &str) -> bool {
    name.split('.').any(|c| matches!(c, "visual" | "vision_tower" | "vision_model"))
}

/// A recipe name with its block and layer indices replaced: `layers.N.mlp.down_proj…`.
fn kind_of(name: &str) -> String {
    name.split('.')
        .map(|c| if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) { "N" } else { c })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether `name` is of a kind `other` has too, at an index past every index `other` has
/// for that kind (a block or layer the other, smaller model does not have).
fn beyond_the_other_model(name: &str, other: &BTreeSet<&str>) -> bool {
    let kind = kind_of(name);
    let index = |n: &str| -> Vec<u64> { n.split('.').filter_map(|c| c.parse().ok()).collect() };
    let mine = index(name);
    let theirs: Vec<Vec<u64>> = other.iter().filter(|o| kind_of(o) == kind).map(|o| index(o)).collect();
    !theirs.is_empty() && theirs.iter().all(|t| t.len() == mine.len() && t < &mine)
}

/// `model.language_model.layers.0.x` / `language_model.layers.0.x` → `layers.0.x`.
pub fn normalize(name: &str) -> &str {
    match name.find("language_model.") {
        Some(i) => &name[i + "language_model.".len()..],
        None => name,
    }
}

/// (normalized name, importance) per recipe of a manifest, in the manifest's order.
fn importances(m: &Value) -> Vec<(String, Option<f64>)> {
    m.get("layer_sensitivity")
        .and_then(Value::as_object)
        .map(|ls| {
            ls.iter().map(|(k, v)| (normalize(k).to_string(), v.get("importance").and_then(Value::as_f64))).collect()
        })
        .unwrap_or_default()
}

/// Relative difference, 0 when both are 0.
pub fn rel_diff(a: f64, b: f64) -> f64 {
    let scale = a.abs().max(b.abs());
    if scale == 0.0 {
        0.0
    } else {
        (a - b).abs() / scale
    }
}

fn compare_layers(ma: &Value, mb: &Value, tol: &Tolerance, report: &mut ParityReport) {
    let (ia, ib) = (importances(ma), importances(mb));
    let raw_a: Vec<&str> = ma
        .get("layer_sensitivity")
        .and_then(Value::as_object)
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let raw_b: Vec<&str> = mb
        .get("layer_sensitivity")
        .and_then(Value::as_object)
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let renamed = |raw: &[&str]| raw.iter().filter(|k| normalize(k) != **k && !is_vision(k)).count();
    for (label, raw) in [("committed", &raw_a), ("candidate", &raw_b)] {
        let n = renamed(raw);
        if n > 0 {
            let example = raw.iter().find(|k| normalize(k) != **k && !is_vision(k)).unwrap();
            report.notes.push(format!(
                "scope difference: {label} names {n} language-model recipes with a module prefix (`{example}`); \
                 compared as `{}`",
                normalize(example)
            ));
        }
    }
    let names_a: BTreeSet<&str> = ia.iter().map(|(k, _)| k.as_str()).collect();
    let names_b: BTreeSet<&str> = ib.iter().map(|(k, _)| k.as_str()).collect();
    let only_a: Vec<&str> = names_a.difference(&names_b).copied().collect();
    let only_b: Vec<&str> = names_b.difference(&names_a).copied().collect();
    // Whole-model runs on both sides: their tower recipes are compared like the others.
    let both_full = names_a.iter().any(|k| is_vision(k)) && names_b.iter().any(|k| is_vision(k));
    // Two different models (`model.id`) of one architecture: recipes past the smaller
    // model's blocks and layers are its size, not drift.
    let other_model = ma.pointer("/model/id").is_some() && ma.pointer("/model/id") != mb.pointer("/model/id");
    for (label, only, other) in [("committed", &only_a, &names_b), ("candidate", &only_b, &names_a)] {
        let (vision, lm): (Vec<&str>, Vec<&str>) = only.iter().partition(|k| is_vision(k) && !both_full);
        let (sized, lm): (Vec<&str>, Vec<&str>) =
            lm.into_iter().partition(|k| other_model && beyond_the_other_model(k, other));
        if !sized.is_empty() {
            report.notes.push(format!(
                "model size: only the {label} files list {} recipes (e.g. `{}`) past the other model's last block or \
                 layer of the same kind: the models differ in size; left out of the comparison",
                sized.len(),
                sized[0]
            ));
        }
        if !vision.is_empty() {
            report.notes.push(format!(
                "scope difference: only the {label} files list {} vision-tower recipes (e.g. `{}`): it came from a \
                 full-model scope, while LM-only runs score the language model alone; they are left out of the \
                 comparison",
                vision.len(),
                vision[0]
            ));
        }
        if !lm.is_empty() {
            let which = if label == "committed" { "baseline-only" } else { "new" };
            report.drift.push(format!(
                "layer set: {} {which} layer(s), only in {label}: {}{}",
                lm.len(),
                lm.iter().take(MAX_LISTED).map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
                if lm.len() > MAX_LISTED { ", …" } else { "" }
            ));
        }
    }

    // Numbers over the shared, non-vision layers.
    let mb_map: BTreeMap<&str, Option<f64>> = ib.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let mut pa: Vec<(String, f64)> = Vec::new();
    let mut pb: Vec<(String, f64)> = Vec::new();
    let mut worst: Option<(String, f64, f64, f64)> = None;
    let mut over: Vec<(String, f64, f64, f64)> = Vec::new();
    for (k, va) in &ia {
        let Some(vb) = mb_map.get(k.as_str()) else { continue };
        if is_vision(k) && !both_full {
            continue;
        }
        let (Some(x), Some(y)) = (va, vb) else {
            report.drift.push(format!("layer `{k}`: `importance` is not a number on one side"));
            continue;
        };
        let d = rel_diff(*x, *y);
        if worst.as_ref().is_none_or(|w| d > w.3) {
            worst = Some((k.clone(), *x, *y, d));
        }
        if d > tol.rel || d.is_nan() {
            over.push((k.clone(), *x, *y, d));
        }
        pa.push((k.clone(), *x));
        pb.push((k.clone(), *y));
    }
    over.sort_by(|a, b| b.3.total_cmp(&a.3));
    for (k, x, y, d) in over.iter().take(MAX_LISTED) {
        report.drift.push(format!(
            "layer `{k}`: sensitivity {} (committed) vs {} (candidate), relative difference {} > {}",
            repr_f64(*x),
            repr_f64(*y),
            format_e(*d, 3),
            repr_f64(tol.rel)
        ));
    }
    if over.len() > MAX_LISTED {
        report.drift.push(format!("… and {} more layers over the relative tolerance", over.len() - MAX_LISTED));
    }
    let rho = stats::spearman_by_name(&pa, &pb);
    let f = &mut report.figures;
    f.insert("layers_compared".into(), json!(pa.len()));
    f.insert("layers_over_tolerance".into(), json!(over.len()));
    if let Some((k, x, y, d)) = &worst {
        f.insert("worst_layer".into(), json!(k));
        f.insert("worst_rel_diff".into(), json!(d));
        f.insert("worst_committed".into(), json!(x));
        f.insert("worst_candidate".into(), json!(y));
    }
    f.insert("spearman".into(), json!(rho));
    f.insert("top10_overlap".into(), json!(stats::top_k_overlap(&pa, &pb, 10)));
    f.insert("rel_tolerance".into(), json!(tol.rel));
    f.insert("min_spearman".into(), json!(tol.min_spearman));
    match rho {
        Some(r) if r < tol.min_spearman => report.drift.push(format!(
            "ranking: Spearman ρ = {} over {} layers < {}",
            format_e(r, 6),
            pa.len(),
            repr_f64(tol.min_spearman)
        )),
        None if pa.len() >= 2 && over.is_empty() => {} // constant on both sides and equal: nothing to rank
        None if pa.len() >= 2 => {
            report.drift.push(format!("ranking: Spearman ρ is undefined over {} layers (a constant side)", pa.len()))
        }
        _ => {}
    }
}

// ---- one side's internal consistency ---------------------------------------------------

fn check_consistency(side: &Side, report: &mut ParityReport) {
    let label = side.label;
    if let (Some(j), Some(md)) = (&side.json, &side.md) {
        let rows = j.get("layer_sensitivity").and_then(Value::as_array).cloned().unwrap_or_default();
        let table = markdown::parse_table(md);
        if rows.len() != table.len() {
            report.drift.push(format!(
                "{label}: `{REPORT_MD}` has {} table rows but `{REPORT_JSON}` has {} layers",
                table.len(),
                rows.len()
            ));
        }
        for (i, (row, cells)) in rows.iter().zip(&table).enumerate() {
            let layer = row.get("layer").and_then(Value::as_str).unwrap_or("?");
            let num = |k: &str| row.get(k).and_then(Value::as_f64);
            let want = [
                Some(layer.to_string()),
                num("num_bits").map(repr_f64),
                num("sensitivity").map(|x| format_e(x, 3)),
                num("size_cost").map(|x| format_e(x, 3)),
            ];
            let cols = ["Layer", "Num Bits", "Sensitivity", "Size Cost"];
            for (c, (w, got)) in want.iter().zip(cells).enumerate() {
                if w.as_deref() != Some(got.as_str()) {
                    report.drift.push(format!(
                        "{label}: `{REPORT_MD}` row {} (layer `{layer}`), column {}: `{got}`, but `{REPORT_JSON}` says `{}`",
                        i + 1,
                        cols[c],
                        w.as_deref().unwrap_or("(no number)")
                    ));
                    break;
                }
            }
        }
        if let Some(fig) = markdown::figure_link(md) {
            if !side.dir.join(&fig).is_file() {
                report.drift.push(format!("{label}: `{REPORT_MD}` links the figure `{fig}`, which is missing"));
            }
        }
    }
    if let (Some(j), Some(m)) = (&side.json, &side.manifest) {
        let ls = m.get("layer_sensitivity").and_then(Value::as_object);
        for row in j.get("layer_sensitivity").and_then(Value::as_array).into_iter().flatten() {
            let layer = row.get("layer").and_then(Value::as_str).unwrap_or("?");
            let want = ls.and_then(|ls| ls.get(&format!("{layer}.quant_recipe"))).and_then(|r| r.get("importance"));
            let got = row.get("sensitivity");
            if want.and_then(Value::as_f64) != got.and_then(Value::as_f64) {
                report.drift.push(format!(
                    "{label}: layer `{layer}`: `{REPORT_JSON}` sensitivity {} differs from the manifest's importance {}",
                    got.map_or("(none)".into(), Value::to_string),
                    want.map_or("(none)".into(), Value::to_string)
                ));
            }
        }
    }
}

/// Files under `dir` (recursively) whose names end with `suffix`, sorted.
pub fn files_named(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.file_name().to_string_lossy().ends_with(suffix))
        .map(|e| e.into_path())
        .collect();
    out.sort();
    out
}

/// The legacy artifacts (`<repo>/../shared/reference/legacy-layer-analysis`, or
/// `/work/shared/...`) for tests; `None`, after a loud `SKIP:` line, when absent.
#[cfg(test)]
pub(crate) fn legacy_dir() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rel = "reference/legacy-layer-analysis";
    let found =
        [repo.join("../shared").join(rel), PathBuf::from("/work/shared").join(rel)].into_iter().find(|p| p.is_dir());
    if found.is_none() {
        eprintln!("SKIP: legacy artifacts not found at <repo>/../shared/{rel} or /work/shared/{rel}");
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::build_manifest;
    use crate::aggregate::tests::{scheme, synthetic_state};
    use crate::io::pyjson;
    use crate::render::{markdown, svg, Report};

    /// Write a run folder the way aggregate + render do.
    fn write_run(dir: &Path, manifest: &Value) {
        std::fs::create_dir_all(dir).unwrap();
        let name = manifest["scheme"]["name"].as_str().unwrap();
        pyjson::write(&dir.join(format!("{name}{MANIFEST_SUFFIX}")), manifest).unwrap();
        let r = Report::from_manifest(manifest).unwrap();
        pyjson::write(&dir.join(REPORT_JSON), &r.to_json()).unwrap();
        std::fs::write(dir.join(REPORT_MD), markdown::render(&r, Some("per-layer-sensitivity.svg"))).unwrap();
        std::fs::write(dir.join("per-layer-sensitivity.svg"), svg::render(&r)).unwrap();
    }

    /// A smaller model of the same architecture (another `model.id`): the layers it lacks
    /// are a size note; the same model missing its last layer is drift.
    #[test]
    fn a_smaller_model_is_a_size_note_and_a_lost_layer_of_the_same_model_is_drift() {
        let t = tempfile::tempdir().unwrap();
        let small = build_manifest(&synthetic_state(2, "FP8"), &scheme(), &json!({"id": "tiny"})).unwrap();
        let big = build_manifest(&synthetic_state(4, "FP8"), &scheme(), &json!({"id": "4b"})).unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        write_run(&a, &small);
        write_run(&b, &big);
        let r = compare(&a, &b, &Tolerance::default());
        assert!(r.notes.iter().any(|n| n.contains("model size") && n.contains("8 recipes")), "{r:#?}");
        assert!(!r.drift.iter().any(|d| d.contains("layer set")), "{r:#?}");
        let same = build_manifest(&synthetic_state(4, "FP8"), &scheme(), &json!({"id": "tiny"})).unwrap();
        write_run(&c, &same);
        let r = compare(&a, &c, &Tolerance::default());
        assert!(r.drift.iter().any(|d| d.contains("layer set: 8 new layer(s)")), "{r:#?}");
    }

    fn two_runs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let m = build_manifest(&synthetic_state(3, "FP8"), &scheme(), &json!({"id": "m"})).unwrap();
        let (a, b) = (t.path().join("committed"), t.path().join("candidate"));
        write_run(&a, &m);
        write_run(&b, &m);
        (t, a, b)
    }

    fn manifest_path(dir: &Path) -> PathBuf {
        dir.join(format!("wfp8_afp16_autoquant_lm{MANIFEST_SUFFIX}"))
    }

    fn edit(path: &Path, f: impl FnOnce(&mut Value)) {
        let mut v = pyjson::read(path).unwrap();
        f(&mut v);
        pyjson::write(path, &v).unwrap();
    }

    #[test]
    fn identical_runs_are_at_parity() {
        let (_t, a, b) = two_runs();
        let r = compare(&a, &b, &Tolerance::default());
        assert!(r.drift.is_empty() && r.errors.is_empty() && r.notes.is_empty(), "{r:#?}");
        assert_eq!(r.figures["spearman"], json!(1.0));
        assert_eq!(r.figures["layers_compared"], json!(12));
        assert_eq!(r.figures["worst_rel_diff"], json!(0.0));
    }

    #[test]
    fn a_tampered_number_is_drift_naming_the_layer() {
        let (_t, a, b) = two_runs();
        // Manifest and report edited consistently, as a re-scored run would differ.
        edit(&manifest_path(&a), |m| {
            m["layer_sensitivity"]["layers.2.mlp.down_proj.quant_recipe"]["importance"] = json!(0.5)
        });
        let r = compare(&a, &b, &Tolerance::default());
        assert!(
            r.drift.iter().any(|d| d.contains("layer `layers.2.mlp.down_proj.quant_recipe`: sensitivity 0.5")),
            "{r:#?}"
        );
        assert_eq!(r.figures["worst_layer"], json!("layers.2.mlp.down_proj.quant_recipe"));
        // The committed JSON no longer matches its manifest either.
        assert!(r.drift.iter().any(|d| d.contains("committed: layer `layers.2.mlp.down_proj`")), "{r:#?}");

        // A number changed in the report JSON only: inconsistent with its Markdown.
        let (_t, a, b) = two_runs();
        edit(&a.join(REPORT_JSON), |j| j["layer_sensitivity"][3]["sensitivity"] = json!(1.0e-30));
        let r = compare(&a, &b, &Tolerance::default());
        let layer =
            pyjson::read(&a.join(REPORT_JSON)).unwrap()["layer_sensitivity"][3]["layer"].as_str().unwrap().to_string();
        assert!(r.drift.iter().any(|d| d.contains(&format!("row 4 (layer `{layer}`), column Sensitivity"))), "{r:#?}");
    }

    #[test]
    fn a_missing_markdown_is_drift() {
        let (_t, a, b) = two_runs();
        std::fs::remove_file(a.join(REPORT_MD)).unwrap();
        let r = compare(&a, &b, &Tolerance::default());
        assert!(r.drift.iter().any(|d| d.contains("`per-layer-sensitivity.md` is missing")), "{r:#?}");
        assert!(r.errors.is_empty());
        std::fs::remove_file(b.join("per-layer-sensitivity.svg")).unwrap();
        let r = compare(&b, &b, &Tolerance::default());
        assert!(r.drift.iter().any(|d| d.contains("links the figure `per-layer-sensitivity.svg`, which is missing")));
    }

    #[test]
    fn a_renamed_key_is_drift_naming_the_key() {
        let (_t, a, b) = two_runs();
        edit(&b.join(REPORT_JSON), |j| {
            for row in j["layer_sensitivity"].as_array_mut().unwrap() {
                let o = row.as_object_mut().unwrap();
                let v = o.shift_remove("size_cost").unwrap();
                o.insert("size_costs".into(), v);
            }
        });
        edit(&manifest_path(&b), |m| {
            let o = m["autoquant_state"].as_object_mut().unwrap();
            let v = o.shift_remove("is_satisfied").unwrap();
            o.insert("satisfied".into(), v);
        });
        let r = compare(&a, &b, &Tolerance::default());
        let has = |s: &str| r.drift.iter().any(|d| d.contains(s));
        assert!(has("key `layer_sensitivity[].size_cost` is in committed, missing in candidate"), "{r:#?}");
        assert!(has("key `layer_sensitivity[].size_costs` is new in candidate"), "{r:#?}");
        assert!(has("key `autoquant_state.is_satisfied` is in committed, missing in candidate"), "{r:#?}");
    }

    #[test]
    fn layer_sets_and_ranking_are_compared() {
        let (_t, a, b) = two_runs();
        edit(&manifest_path(&b), |m| {
            let ls = m["layer_sensitivity"].as_object_mut().unwrap();
            ls.shift_remove("layers.1.self_attn.o_proj.quant_recipe");
            // Reverse the ranking of everything else.
            for v in ls.values_mut() {
                let x = v["importance"].as_f64().unwrap();
                v["importance"] = json!(if x > 0.0 { 1.0 / x } else { 1e9 });
            }
        });
        let r = compare(&a, &b, &Tolerance::default());
        let has = |s: &str| r.drift.iter().any(|d| d.contains(s));
        assert!(has("1 baseline-only layer(s), only in committed: `layers.1.self_attn.o_proj.quant_recipe`"), "{r:#?}");
        assert!(has("ranking: Spearman"), "{r:#?}");
        assert!(r.figures["spearman"].as_f64().unwrap() < 0.0);
    }

    #[test]
    fn unreadable_files_are_errors() {
        let (_t, a, b) = two_runs();
        std::fs::write(b.join(REPORT_JSON), "{ not json").unwrap();
        let r = compare(&a, &b, &Tolerance::default());
        assert!(
            r.errors.iter().any(|e| e.contains("per-layer-sensitivity.json") && e.contains("not valid JSON")),
            "{r:#?}"
        );
        let r = compare(&a, &a.join("nope"), &Tolerance::default());
        assert!(r.errors.iter().any(|e| e.contains("does not exist")), "{r:#?}");
    }

    /// The schema of what qpipe writes equals the legacy files' (key paths and types).
    #[test]
    fn schema_equals_the_legacy_files() {
        let Some(legacy) = legacy_dir() else { return };
        let ours = build_manifest(&synthetic_state(2, "FP8"), &scheme(), &json!({"id": "m"})).unwrap();
        let our_json = Report::from_manifest(&ours).unwrap().to_json();
        let mut checked = 0;
        for path in files_named(&legacy, MANIFEST_SUFFIX) {
            let theirs = pyjson::read(&path).unwrap();
            assert_eq!(
                schema(&ours, &["layers", "layer_sensitivity"]),
                schema(&theirs, &["layers", "layer_sensitivity"]),
                "{}",
                path.display()
            );
            let theirs = pyjson::read(&path.parent().unwrap().join(REPORT_JSON)).unwrap();
            assert_eq!(schema(&our_json, &[]), schema(&theirs, &[]), "{}", path.display());
            checked += 1;
        }
        assert!(checked >= 7);
    }

    /// The `scheme` and `model` the planner gives aggregate have the legacy key sets.
    #[test]
    fn planned_scheme_and_model_have_the_legacy_keys() {
        let Some(legacy) = legacy_dir() else { return };
        let dir = tempfile::tempdir().unwrap();
        crate::plan::tests::copy_tiny_config(dir.path());
        std::fs::write(dir.path().join("c.txt"), "a\n").unwrap();
        let config = json!({
            "model": {"name": "tiny", "path": "."},
            "dataset": {"name": "captions", "captions_path": "c.txt", "size": "small",
                        "size_to_max_samples": {"small": 16}, "calib_seq_len": 512},
            "quant_pair": {"name": "wfp8_afp16", "weight": "fp8", "activation": "fp16",
                           "format_name": "FP8_WEIGHT_ONLY_CFG"},
            "quant_granularity": {"name": "default"},
            "autoquant": {"method": "gradient", "batch_size": 8, "score_size": 128,
                          "effective_bits": 8.0, "device": "auto"},
            "output_layout": {"name": "publish", "mode": "publish", "root_dir": "models/tiny/layer-analysis"},
            "runner": {}
        });
        let ctx = qpipe_contract::PlanContext { root: dir.path().into(), pipeline_file: "pipeline.yaml".into() };
        let run = qpipe_contract::Run { config, overrides: vec![], published: false };
        let inst = crate::plan::plan(&ctx, &[run]).unwrap().instances;
        let agg = inst.iter().find(|i| i.kind == "aggregate").unwrap();
        for path in files_named(&legacy, MANIFEST_SUFFIX) {
            let theirs = pyjson::read(&path).unwrap();
            for key in ["scheme", "model"] {
                assert_eq!(schema(&agg.params[key], &[]), schema(&theirs[key], &[]), "`{key}` vs {}", path.display());
            }
        }
    }

    /// The legacy INT8 "LM-only" folder as the baseline of an LM-only run made from the same
    /// numbers: scope-difference notes (vision modules, module prefix), no drift, no panic.
    #[test]
    fn legacy_folder_as_baseline_reports_a_scope_difference() {
        let Some(legacy) = legacy_dir() else { return };
        let committed = legacy.join("weight-int8-act-int8/qwen3_vl_4b_autoquant_int8_lm_small");
        let m = pyjson::read(&files_named(&committed, MANIFEST_SUFFIX)[0]).unwrap();
        // An LM-only state with the same numbers and qpipe's module names.
        let mut stats = serde_json::Map::new();
        for (k, v) in m["layer_sensitivity"].as_object().unwrap() {
            if !is_vision(k) {
                stats.insert(normalize(k).to_string(), v.clone());
            }
        }
        let layers: Vec<&str> =
            m["layers"].as_object().unwrap().keys().filter(|k| !is_vision(k)).map(|k| normalize(k)).collect();
        let a = &m["autoquant_state"];
        let state = json!({"quantized_layers": layers, "candidate_stats": stats, "constraints": a["constraints"],
                           "best": {"score": a["score"], "is_satisfied": a["is_satisfied"]}});
        let t = tempfile::tempdir().unwrap();
        write_run(t.path(), &build_manifest(&state, &m["scheme"], &m["model"]).unwrap());
        let r = compare(&committed, t.path(), &Tolerance::default());
        assert!(r.errors.is_empty(), "{r:#?}");
        assert!(r.drift.is_empty(), "{r:#?}");
        assert!(r.notes.iter().any(|n| n.contains("105 vision-tower recipes")), "{r:#?}");
        assert!(r.notes.iter().any(|n| n.contains("module prefix")), "{r:#?}");
        assert_eq!(r.figures["layers_compared"], json!(144));

        // The other way round (`--baseline` passes the baseline as the candidate).
        let r = compare(t.path(), &committed, &Tolerance::default());
        assert!(r.errors.is_empty() && r.drift.is_empty(), "{r:#?}");
        assert!(r.notes.iter().any(|n| n.contains("only the candidate files list 105 vision-tower recipes")), "{r:#?}");

        // Against a synthetic run that shares nothing: drift, still no panic, no errors.
        let (_t, _a, b) = two_runs();
        let r = compare(&committed, &b, &Tolerance::default());
        assert!(r.errors.is_empty() && !r.drift.is_empty(), "{r:#?}");
        assert!(r.notes.iter().any(|n| n.contains("vision-tower")));
    }
}
