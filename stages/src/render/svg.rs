//! `per-layer-sensitivity.svg`: a heatmap of the per-layer sensitivities.
//!
//! Columns are decoder layers (`layers.<N>.`), rows are projections (the recipe heads:
//! `self_attn.q_proj` stands for q/k/v, `mlp.gate_proj` for gate/up), colour is
//! `log10(sensitivity)` on a viridis-like scale with a legend in decades. Zero scores are
//! grey, missing cells white. Each cell carries a `<title>` (hover text on GitHub) with the
//! same `{:.3e}` number as the Markdown table. Self-contained: no fonts, scripts or links.
//! Recipes outside the decoder layers (a vision tower, say) are counted under the figure.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::io::pyjson::format_e;
use crate::render::Report;

/// Anchor colours of the scale, low → high (perceptually ordered, dark to light).
const SCALE: [(u8, u8, u8); 9] = [
    (0x44, 0x01, 0x54),
    (0x47, 0x2d, 0x7b),
    (0x3b, 0x52, 0x8b),
    (0x2c, 0x72, 0x8e),
    (0x21, 0x91, 0x8c),
    (0x28, 0xae, 0x80),
    (0x5e, 0xc9, 0x62),
    (0xad, 0xdc, 0x30),
    (0xfd, 0xe7, 0x25),
];
const ZERO_FILL: &str = "#d0d0d0";
const PROJECTION_ORDER: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The scale's colour at `t` in [0, 1].
pub fn colour(t: f64) -> String {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (SCALE.len() - 1) as f64;
    let i = (x.floor() as usize).min(SCALE.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
    let (a, b) = (SCALE[i], SCALE[i + 1]);
    format!("#{:02x}{:02x}{:02x}", mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// `layers.12.mlp.gate_proj` (or `model.language_model.layers.12...`) → (12, `mlp.gate_proj`).
pub fn split_decoder_layer(layer: &str) -> Option<(usize, &str)> {
    let start = if layer.starts_with("layers.") { 0 } else { layer.find(".layers.")? + 1 };
    let rest = &layer[start + "layers.".len()..];
    let (idx, proj) = rest.split_once('.')?;
    Some((idx.parse().ok()?, proj))
}

fn projection_key(p: &str) -> (usize, String) {
    let last = p.rsplit('.').next().unwrap_or(p);
    (PROJECTION_ORDER.iter().position(|x| *x == last).unwrap_or(PROJECTION_ORDER.len()), p.to_string())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The SVG document.
pub fn render(report: &Report) -> String {
    let mut cells: BTreeMap<(usize, String), f64> = BTreeMap::new();
    let mut other = 0usize;
    for row in &report.rows {
        match split_decoder_layer(&row.layer) {
            Some((l, p)) => {
                cells.insert((l, p.to_string()), row.sensitivity);
            }
            None => other += 1,
        }
    }
    let mut projections: Vec<(usize, String)> = cells.keys().map(|(_, p)| projection_key(p)).collect();
    projections.sort();
    projections.dedup();
    let n_layers = cells.keys().map(|(l, _)| l + 1).max().unwrap_or(0);

    let positive: Vec<f64> = cells.values().copied().filter(|v| *v > 0.0 && v.is_finite()).collect();
    let (lo, hi) = if positive.is_empty() {
        (0, 1)
    } else {
        let lo = positive.iter().copied().fold(f64::INFINITY, f64::min).log10().floor() as i32;
        let hi = positive.iter().copied().fold(f64::NEG_INFINITY, f64::max).log10().ceil() as i32;
        (lo, if hi > lo { hi } else { lo + 1 })
    };
    let t_of = |v: f64| (v.log10() - f64::from(lo)) / f64::from(hi - lo);

    // Wide cells for a few layers, 18 px up to 48 layers, thinner beyond.
    let cw = if n_layers <= 48 { (640 / n_layers.max(1)).clamp(18, 56) } else { (864 / n_layers).max(6) };
    let ch = 24;
    let left = 130;
    let top = 74;
    let subtitle = "decoder layer × projection · colour = log10(sensitivity)";
    let model_line = format!("model: {}", report.model_id());
    let grid_w = cw * n_layers.max(1);
    let grid_h = ch * projections.len().max(1);
    let legend_y = top + grid_h + 44;
    // Sans-serif at 11px averages under 6.5px a character.
    let text_w = 20 + (model_line.chars().count().max(subtitle.chars().count()) * 13).div_ceil(2);
    let width = (left + grid_w + 20).max(left + 360).max(text_w);
    let height = legend_y + 62 + if other > 0 { 16 } else { 0 };

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"sans-serif\" font-size=\"11\" role=\"img\" aria-label=\"Per-layer sensitivity heatmap\">"
    );
    let _ = writeln!(s, "<rect width=\"{width}\" height=\"{height}\" fill=\"#ffffff\"/>");
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\" fill=\"#222\">Per-layer sensitivity: {}</text>",
        esc(report.scheme_name())
    );
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"38\" fill=\"#555\">{subtitle}</text>\n<text x=\"10\" y=\"54\" fill=\"#555\">{}</text>",
        esc(&model_line)
    );

    // Row labels and cells.
    for (r, (_, proj)) in projections.iter().enumerate() {
        let y = top + r * ch;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#222\">{}</text>",
            left - 6,
            y + ch / 2 + 4,
            esc(proj)
        );
        for l in 0..n_layers {
            let x = left + l * cw;
            let (fill, tip) = match cells.get(&(l, proj.clone())) {
                Some(v) if *v > 0.0 && v.is_finite() => (colour(t_of(*v)), format_e(*v, 3)),
                Some(v) => (ZERO_FILL.to_string(), format_e(*v, 3)),
                None => ("#ffffff".to_string(), "not scored".to_string()),
            };
            let _ = writeln!(
                s,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cw}\" height=\"{ch}\" fill=\"{fill}\" stroke=\"#ffffff\" \
                 stroke-width=\"1\"><title>layers.{l}.{}: {tip}</title></rect>",
                esc(proj)
            );
        }
    }
    // Column labels: every layer when they fit, else every fifth.
    let step = if cw >= 14 { 1 } else { 5 };
    for l in (0..n_layers).step_by(step) {
        let x = left + l * cw + cw / 2;
        let _ = writeln!(
            s,
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" fill=\"#444\" font-size=\"9\">{l}</text>",
            top + grid_h + 12
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#222\">decoder layer</text>",
        left + grid_w / 2,
        top + grid_h + 28
    );

    // Legend: the gradient in decades, and the zero swatch.
    let lw = 300;
    let _ = writeln!(s, "<defs><linearGradient id=\"scale\" x1=\"0\" x2=\"1\" y1=\"0\" y2=\"0\">");
    for i in 0..SCALE.len() {
        let t = i as f64 / (SCALE.len() - 1) as f64;
        let _ = writeln!(s, "<stop offset=\"{:.3}\" stop-color=\"{}\"/>", t, colour(t));
    }
    let _ = writeln!(s, "</linearGradient></defs>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#222\">sensitivity</text>",
        left - 6,
        legend_y + 10
    );
    let _ = writeln!(s, "<rect x=\"{left}\" y=\"{legend_y}\" width=\"{lw}\" height=\"12\" fill=\"url(#scale)\"/>");
    let decades = (hi - lo) as usize;
    let every = decades.div_ceil(8).max(1);
    for (k, d) in (lo..=hi).enumerate() {
        if k % every != 0 && d != hi {
            continue;
        }
        let x = left + (lw * k) / decades;
        let _ = writeln!(
            s,
            "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#222\"/>",
            legend_y + 12,
            legend_y + 16
        );
        let _ =
            writeln!(s, "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" fill=\"#222\">1e{d}</text>", legend_y + 28);
    }
    let zx = left + lw + 16;
    let _ = writeln!(s, "<rect x=\"{zx}\" y=\"{legend_y}\" width=\"12\" height=\"12\" fill=\"{ZERO_FILL}\"/>");
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" fill=\"#222\">0</text>", zx + 16, legend_y + 10);
    if other > 0 {
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{}\" fill=\"#555\">{other} recipe(s) outside the decoder layers are listed in the table, not drawn.</text>",
            legend_y + 52
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::build_manifest;
    use crate::aggregate::tests::{scheme, synthetic_state};
    use serde_json::json;

    #[test]
    fn decoder_layers_are_recognised() {
        assert_eq!(split_decoder_layer("layers.12.mlp.gate_proj"), Some((12, "mlp.gate_proj")));
        assert_eq!(
            split_decoder_layer("model.language_model.layers.3.self_attn.o_proj"),
            Some((3, "self_attn.o_proj"))
        );
        assert_eq!(split_decoder_layer("visual.blocks.0.attn.qkv"), None);
    }

    #[test]
    fn heatmap_has_a_cell_per_recipe_and_a_legend() {
        let mut st = synthetic_state(3, "FP8");
        st["candidate_stats"]["visual.blocks.0.attn.qkv.quant_recipe"] = json!({
            "formats": ["X(effective-bits: 8.0)", "NONE(effective-bits: 16.0)"], "scores": [0.5, 0.0],
            "costs": [1.0, 2.0], "module_names": []});
        let m = build_manifest(&st, &scheme(), &json!({"id": "m & <n>"})).unwrap();
        let svg = render(&Report::from_manifest(&m).unwrap());
        assert_eq!(svg.matches("<title>layers.").count(), 12);
        assert!(svg.contains("<title>layers.1.mlp.gate_proj: 1.700e-06</title>"), "{svg}");
        assert!(svg.contains("m &amp; &lt;n&gt;"));
        assert!(svg.contains(&format!("fill=\"{ZERO_FILL}\"><title>")) || svg.contains(ZERO_FILL));
        assert!(svg.contains("1 recipe(s) outside the decoder layers"));
        assert!(svg.contains(">1e-8<") && svg.contains(">1e1<"), "{svg}");
        assert!(!svg.contains("<script") && !svg.contains("@import") && !svg.contains("href=\"http"));
        // Deterministic.
        assert_eq!(svg, render(&Report::from_manifest(&m).unwrap()));
    }

    #[test]
    fn colours_run_dark_to_light() {
        assert_eq!(colour(0.0), "#440154");
        assert_eq!(colour(1.0), "#fde725");
        assert_eq!(colour(f64::NAN), "#440154");
    }
}
