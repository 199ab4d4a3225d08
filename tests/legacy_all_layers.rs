//! The published all-layers runs of the tiny model against the legacy all-layers INT8 runs
//! of Qwen3-VL-4B (`../shared/reference/legacy-layer-analysis/weight-int8-act-int8/
//! qwen3_vl_4b_autoquant_all_layers_int8_<size>`): the same schema (every key path and
//! value type of the manifest and of `per-layer-sensitivity.json`), the same scheme
//! (`int8_autoquant_all_layers_int8`, `coverage_mode: full`), and the same group set up to
//! the model's size (block and layer indices aside). SKIPs loudly when `../shared` is absent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Key paths with value types; list items and per-layer maps collapse to one member.
fn schema(v: &Value, path: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            out.insert(format!("{path}: object"));
            let per_layer = path.ends_with("layers") || path.ends_with("layer_sensitivity");
            for (k, x) in m {
                let key = if per_layer { "*" } else { k.as_str() };
                schema(x, &format!("{path}.{key}"), out);
            }
        }
        Value::Array(a) => {
            out.insert(format!("{path}: array"));
            for x in a {
                schema(x, &format!("{path}[]"), out);
            }
        }
        Value::Number(_) => {
            out.insert(format!("{path}: number"));
        }
        Value::String(_) => {
            out.insert(format!("{path}: string"));
        }
        Value::Bool(_) => {
            out.insert(format!("{path}: bool"));
        }
        Value::Null => {
            out.insert(format!("{path}: null"));
        }
    }
}

/// A group name with its block/layer indices replaced by `N`.
fn shape_of(name: &str) -> String {
    name.split('.').map(|p| if p.chars().all(|c| c.is_ascii_digit()) { "N" } else { p }).collect::<Vec<_>>().join(".")
}

#[test]
fn all_layers_runs_have_the_legacy_schema_and_group_set() {
    let legacy = root().join("../shared/reference/legacy-layer-analysis/weight-int8-act-int8");
    if !legacy.is_dir() {
        eprintln!("SKIP: {} is absent (CI has it)", legacy.display());
        return;
    }
    let ours_dir = root().join("models/tiny_qwen3_vl/layer-analysis/weight-int8-act-int8");
    for size in ["small", "medium", "large"] {
        let ours = ours_dir.join(format!("tiny_qwen3_vl_autoquant_all_layers_int8_{size}"));
        let theirs = legacy.join(format!("qwen3_vl_4b_autoquant_all_layers_int8_{size}"));
        for file in ["int8_autoquant_all_layers_int8_quant_manifest.json", "per-layer-sensitivity.json"] {
            let (a, b) = (read(&ours.join(file)), read(&theirs.join(file)));
            let (mut sa, mut sb) = (BTreeSet::new(), BTreeSet::new());
            schema(&a, "", &mut sa);
            schema(&b, "", &mut sb);
            assert_eq!(
                sa.symmetric_difference(&sb).collect::<Vec<_>>(),
                Vec::<&String>::new(),
                "{size}/{file}: schema differs"
            );
            assert_eq!(a["scheme"]["name"], "int8_autoquant_all_layers_int8");
            assert_eq!(a["scheme"]["coverage_mode"], b["scheme"]["coverage_mode"], "{size}/{file}");
        }
        let m = |p: &Path| read(&p.join("int8_autoquant_all_layers_int8_quant_manifest.json"));
        let groups = |v: &Value| -> BTreeSet<String> {
            v["layer_sensitivity"].as_object().unwrap().keys().map(|k| shape_of(k)).collect()
        };
        let (a, b) = (m(&ours), m(&theirs));
        assert_eq!(groups(&a), groups(&b), "{size}: group set up to the model's size");
        let layers =
            |v: &Value| -> BTreeSet<String> { v["layers"].as_object().unwrap().keys().map(|k| shape_of(k)).collect() };
        assert_eq!(layers(&a), layers(&b), "{size}: quantized layers up to the model's size");
        eprintln!(
            "{size}: {} groups here ({} in the legacy 4B run), the same {} kinds",
            a["layer_sensitivity"].as_object().unwrap().len(),
            b["layer_sensitivity"].as_object().unwrap().len(),
            groups(&a).len()
        );
    }
}
