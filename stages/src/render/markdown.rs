//! `per-layer-sensitivity.md`: the legacy Markdown report, line for line, plus a link to
//! the heatmap.
//!
//! The legacy layout (a setext title, a bold key/value header, the column glossary, the
//! `.quant_recipe` note, then a left-aligned table with `{:.3e}` numbers) is kept exactly,
//! so a diff against a Python-written report shows only real changes. The figure link is
//! the one addition: a paragraph of its own between the header and the table.

use std::fmt::Write as _;

use crate::io::pyjson::{format_e, format_f, py_bool, repr_f64};
use crate::render::{Report, Row};

const GLOSSARY: &str = "\
- **Layer**: Name of the quant_recipe handle for a group of quantizable modules (e.g., attention or MLP projections).
- **Num Bits**: Effective number of bits allocated for the quantized recipe(s) considered at this layer.
- **Sensitivity**: AutoQuant sensitivity score for the quantized recipe(s). Higher values indicate that quantizing this layer is more harmful to model quality.
- **Size Cost**: Approximate compressed weight size contribution of the layer under the corresponding recipe(s). Higher values indicate more memory usage.
";

const SUFFIX_NOTE: &str = "Note: In the JSON manifest, layer keys may end with `.quant_recipe` (e.g., \
`language_model.layers.0.mlp.gate_proj.quant_recipe`). This suffix is added by ModelOpt to represent the AutoQuant \
hyperparameter attached to that module. In this table we strip the `.quant_recipe` suffix for readability; the \
underlying module path is the part before that suffix.";

const FIGURE_ALT: &str = "Per-layer sensitivity heatmap (decoder layer × projection, log scale)";

/// The table's cells for one row, exactly as printed.
pub fn cells(row: &Row) -> [String; 4] {
    [row.layer.clone(), repr_f64(row.num_bits), format_e(row.sensitivity, 3), format_e(row.size_cost, 3)]
}

/// The Markdown report; `figure` is the SVG's file name, relative to the report.
pub fn render(report: &Report, figure: Option<&str>) -> String {
    let name = report.scheme_name();
    let state = &report.autoquant_state;
    let bits = state
        .get("constraints")
        .and_then(|c| c.get("effective_bits"))
        .or_else(|| report.scheme.get("auto_quantize_bits"))
        .and_then(|v| v.as_f64())
        .unwrap_or(f64::NAN);
    let score = state.get("score").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    let satisfied = state.get("is_satisfied").and_then(|v| v.as_bool()).unwrap_or(false);

    let title = format!("AutoQuant Layer Sensitivity ({name})");
    let mut md = String::new();
    let _ = write!(md, "\n{title}\n{}\n\n\n", "=".repeat(title.chars().count()));
    let _ = write!(md, "**Scheme:** `{name}`\n\n**Model:** `{}`\n\n", report.model_id());
    let _ = write!(md, "**Effective bits (from search):** `{}`\n\n", format_f(bits, 4));
    let _ = write!(md, "**Total AutoQuant score:** `{}`\n\n", format_e(score, 6));
    let _ = writeln!(md, "**Constraint satisfied:** `{}`", py_bool(satisfied));
    if let Some(fig) = figure {
        let _ = write!(md, "\n![{FIGURE_ALT}]({fig})\n\n");
    }
    let _ = write!(md, "## Per-layer sensitivity table\n\n\n{GLOSSARY}\n{SUFFIX_NOTE}\n\n");
    md.push_str("|Layer|Num Bits|Sensitivity|Size Cost|\n| :--- | :--- | :--- | :--- |\n");
    for row in &report.rows {
        let _ = writeln!(md, "|{}|", cells(row).join("|"));
    }
    md
}

/// The report without the figure paragraph (what the legacy tool would have written).
pub fn strip_figure(md: &str) -> String {
    let marker = format!("\n![{FIGURE_ALT}](");
    match md.find(&marker) {
        Some(start) => match md[start + 1..].find("\n\n") {
            Some(len) => format!("{}{}", &md[..start], &md[start + 1 + len + 2..]),
            None => md.to_string(),
        },
        None => md.to_string(),
    }
}

/// The figure file a report links to, if any.
pub fn figure_link(md: &str) -> Option<String> {
    let start = md.find(&format!("![{FIGURE_ALT}]("))? + FIGURE_ALT.len() + 4;
    let end = md[start..].find(')')?;
    Some(md[start..start + end].to_string())
}

/// The table rows of a report: `[layer, num_bits, sensitivity, size_cost]` as printed.
pub fn parse_table(md: &str) -> Vec<[String; 4]> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in md.lines() {
        if line.starts_with("|Layer|") {
            in_table = true;
            continue;
        }
        if !in_table || line.starts_with("| :") {
            continue;
        }
        let parts: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        if let [a, b, c, d] = parts[..] {
            rows.push([a, b, c, d].map(|s| s.trim().to_string()));
        } else {
            break;
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::build_manifest;
    use crate::aggregate::tests::{scheme, synthetic_state};
    use serde_json::json;

    fn report() -> Report {
        let m = build_manifest(&synthetic_state(2, "FP8"), &scheme(), &json!({"id": "models/tiny"})).unwrap();
        Report::from_manifest(&m).unwrap()
    }

    #[test]
    fn header_and_table_follow_the_legacy_layout() {
        let md = render(&report(), Some("per-layer-sensitivity.svg"));
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "");
        assert_eq!(lines[1], "AutoQuant Layer Sensitivity (wfp8_afp16_autoquant_lm)");
        assert_eq!(lines[2], "=".repeat(lines[1].len()));
        assert_eq!(lines[5], "**Scheme:** `wfp8_afp16_autoquant_lm`");
        assert_eq!(lines[7], "**Model:** `models/tiny`");
        assert_eq!(lines[9], "**Effective bits (from search):** `8.0000`");
        assert_eq!(lines[11], "**Total AutoQuant score:** `2.700000e-01`");
        assert_eq!(lines[13], "**Constraint satisfied:** `True`");
        assert!(
            lines[15].starts_with("![Per-layer sensitivity heatmap")
                && lines[15].ends_with("(per-layer-sensitivity.svg)")
        );
        assert!(md.ends_with("|layers.0.mlp.down_proj|8.0|0.000e+00|6.554e+04|\n"), "{md}");
        assert_eq!(figure_link(&md).as_deref(), Some("per-layer-sensitivity.svg"));
        assert_eq!(strip_figure(&md), render(&report(), None));
    }

    #[test]
    fn table_parses_back_to_the_rows() {
        let r = report();
        let table = parse_table(&render(&r, Some("f.svg")));
        assert_eq!(table.len(), r.rows.len());
        assert_eq!(table[0], cells(&r.rows[0]));
        assert_eq!(table[0][2], "1.700e+00");
    }
}
