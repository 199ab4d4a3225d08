//! `pareto.svg`: the front (summed score against achieved bits, the budgets marked) and,
//! beside it, the predicted score of each validated recipe against what it measured on
//! held-out captions. Plain SVG, deterministic text.

use std::fmt::Write;

/// What the plot shows.
pub struct Plot {
    /// The sweep's points: (achieved bits, summed score).
    pub sweep: Vec<(f64, f64)>,
    /// Per budget: (asked bits, achieved bits, summed score).
    pub budgets: Vec<(f64, f64, f64)>,
    /// Per validated recipe: (predicted score, loss increase, KL per token).
    pub validated: Vec<(f64, f64, f64)>,
}

const W: f64 = 420.0;
const H: f64 = 300.0;
const M: f64 = 52.0;

/// Maps `v` in `[lo, hi]` to `[a, b]` (the middle when the range is empty).
fn scale(v: f64, (lo, hi): (f64, f64), (a, b): (f64, f64)) -> f64 {
    if hi > lo {
        a + (v - lo) / (hi - lo) * (b - a)
    } else {
        (a + b) / 2.0
    }
}

fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.filter(|x| x.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// One panel's frame, axis labels and min/max tick labels, at horizontal offset `x0`.
fn frame(s: &mut String, x0: f64, title: &str, xl: &str, yl: &str, xr: (f64, f64), yr: (f64, f64)) {
    let (l, r, t, b) = (x0 + M, x0 + W - 12.0, 28.0, H - 40.0);
    let _ = write!(
        s,
        "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">{title}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{xl}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" transform=\"rotate(-90 {} {})\">{yl}</text>\n",
        r - l,
        b - t,
        (l + r) / 2.0,
        (l + r) / 2.0,
        H - 8.0,
        x0 + 14.0,
        (t + b) / 2.0,
        x0 + 14.0,
        (t + b) / 2.0
    );
    for (v, x, anchor) in [(xr.0, l, "start"), (xr.1, r, "end")] {
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" font-size=\"10\">{}</text>",
            b + 14.0,
            num(v)
        );
    }
    for (v, y) in [(yr.0, b), (yr.1, t + 8.0)] {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{y:.1}\" text-anchor=\"end\" font-size=\"10\">{}</text>",
            l - 4.0,
            num(v)
        );
    }
}

/// A compact number label.
fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v == 0.0 || (1e-2..1e4).contains(&v.abs()) {
        format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.2e}")
    }
}

impl Plot {
    pub fn render(&self) -> String {
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{H}\" viewBox=\"0 0 {} {H}\" \
             font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
            2.0 * W,
            2.0 * W
        );
        // Left: the front.
        let xr = range(self.sweep.iter().map(|p| p.0).chain(self.budgets.iter().map(|b| b.1)));
        let yr = range(self.sweep.iter().map(|p| p.1).chain(self.budgets.iter().map(|b| b.2)));
        frame(&mut s, 0.0, "Pareto front", "achieved effective bits", "summed score (predicted)", xr, yr);
        let px = |x: f64| scale(x, xr, (M, W - 12.0));
        let py = |y: f64| scale(y, yr, (H - 40.0, 28.0));
        let path: Vec<String> = self.sweep.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>",
            path.join(" ")
        );
        for &(asked, x, y) in &self.budgets {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#d62728\"><title>budget {} bits: {} bits, score {}</title></circle>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#d62728\">{}</text>",
                px(x),
                py(y),
                num(asked),
                num(x),
                num(y),
                px(x) + 5.0,
                py(y) - 5.0,
                num(asked)
            );
        }
        // Right: predicted against measured.
        let xr = range(self.validated.iter().map(|v| v.0));
        let yr = range(self.validated.iter().map(|v| v.1));
        frame(&mut s, W, "Prediction check (held-out)", "predicted summed score", "loss increase", xr, yr);
        let px = |x: f64| scale(x, xr, (W + M, 2.0 * W - 12.0));
        let py = |y: f64| scale(y, yr, (H - 40.0, 28.0));
        for &(p, l, kl) in &self.validated {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#2ca02c\"><title>predicted {}, loss +{}, KL {}</title></circle>",
                px(p),
                py(l),
                num(p),
                num(l),
                num(kl)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_panels_deterministically() {
        let p = Plot {
            sweep: vec![(4.0, 3.0), (8.0, 1.0), (16.0, 0.0)],
            budgets: vec![(8.0, 8.0, 1.0)],
            validated: vec![(3.0, 0.2, 0.1), (1.0, 0.05, 0.02)],
        };
        let a = p.render();
        assert_eq!(a, p.render());
        assert!(a.starts_with("<svg") && a.ends_with("</svg>\n"));
        assert_eq!(a.matches("<circle").count(), 3);
        assert!(a.contains("Pareto front") && a.contains("Prediction check"));
    }
}
