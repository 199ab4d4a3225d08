//! The scorer's memory plan: how a scoring run fits in `autoquant.memory_limit` (default:
//! the memory free where the model computes, less a margin) — the weights held once, the
//! checkpoints of the batch being scored (each decoder layer's input), one decoder layer's
//! working set in the backward, and the head over chunks of positions — and what it does
//! when a whole batch does not fit: score it in slices of its rows (when rows are
//! independent), and keep fewer calibration forwards for reuse. A run is refused only
//! when one layer of one row cannot fit, and the error says how much it needs.

use anyhow::{bail, Result};
pub use qpipe_model::memory::Needs;

const GIB: f64 = (1u64 << 30) as f64;

fn gib(b: u64) -> f64 {
    b as f64 / GIB
}

/// A size for people: GiB from 1 GiB, else MiB, else bytes.
pub fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", gib(b))
    } else if b >= 1 << 20 {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{b} B")
    }
}

/// The memory a run may use when none is set: what is free where the model computes
/// (after its weights are loaded) less a margin of a tenth, at least 512 MiB, plus the
/// weights it already holds.
pub fn default_limit(available: Option<u64>, weights: u64) -> Option<u64> {
    available.map(|a| weights + a.saturating_sub((a / 10).max(512 << 20)))
}

/// How one scoring run uses memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The budget; `None` when neither set nor known (then nothing is sliced or chunked).
    pub limit: Option<u64>,
    /// The weights, as held.
    pub weights: u64,
    /// Rows of a batch per forward/backward (the whole batch unless it does not fit).
    pub rows: usize,
    pub batch_rows: usize,
    /// One piece's checkpoints.
    pub checkpoints: u64,
    /// One decoder layer's working set in the backward, the scorer's own per-layer
    /// tensors (prepared weights, quantized inputs) included.
    pub layer: u64,
    /// Positions per head chunk, and the head's working set at that chunk.
    pub head_rows: usize,
    pub head: u64,
    /// Pieces whose checkpoints may be held at once: the one being scored and the
    /// calibration forwards kept for reuse (`kept_forwards − 1` of them).
    pub kept_forwards: usize,
}

impl Plan {
    /// The plan for batches of `batch_rows` rows of `t` positions. `needs(r)` is the
    /// model's [`Needs`] for `r` rows; `scorer_layer` the scorer's own per-layer bytes for
    /// `r` rows; `rows_independent` whether a batch may be split into slices of rows.
    pub fn new(
        limit: Option<u64>,
        weights: u64,
        batch_rows: usize,
        t: usize,
        rows_independent: bool,
        needs: &dyn Fn(usize) -> Needs,
        scorer_layer: &dyn Fn(usize) -> u64,
    ) -> Result<Plan> {
        let whole = |rows: usize, head_rows: usize| -> Plan {
            let n = needs(rows);
            Plan {
                limit,
                weights,
                rows,
                batch_rows,
                checkpoints: n.checkpoints,
                layer: n.layer + scorer_layer(rows),
                head_rows,
                head: n.head(head_rows),
                kept_forwards: 1,
            }
        };
        let Some(limit) = limit else { return Ok(whole(batch_rows, batch_rows * t)) };
        let candidates: Vec<usize> = if rows_independent { (1..=batch_rows).rev().collect() } else { vec![batch_rows] };
        for &most in &candidates {
            // The fewest slices of at most `most` rows, as even as they go (8 rows with
            // room for 7: two slices of 4, not 7 + 1).
            let rows = batch_rows.div_ceil(batch_rows.div_ceil(most));
            let n = needs(rows);
            let fixed = weights + n.checkpoints;
            let layer = n.layer + scorer_layer(rows);
            if fixed + layer > limit || fixed + n.head(1) > limit {
                continue;
            }
            // The head may take what one layer takes (they never run at once), and at
            // least 256 positions per chunk when they fit: what is left keeps calibration
            // forwards for reuse, which saves whole forwards — bigger head chunks save only
            // re-packing the head's weight once per chunk.
            let head_room = layer.max(n.head(256.min(rows * t))).min(limit - fixed);
            let head_rows =
                (((head_room.saturating_sub(n.head_fixed)) / n.head_per_row.max(1)) as usize).clamp(1, rows * t);
            let mut plan = whole(rows, head_rows);
            let work = plan.layer.max(plan.head);
            plan.kept_forwards = (((limit - weights - work) / n.checkpoints.max(1)) as usize).max(1);
            return Ok(plan);
        }
        let one = needs(1);
        let layer = one.layer + scorer_layer(1);
        let need = weights + one.checkpoints + layer.max(one.head(1));
        let rows_note = if rows_independent {
            "one row of a batch"
        } else {
            "a whole batch (a dynamic per-tensor input range spans the batch, so it cannot be sliced)"
        };
        let need = if rows_independent {
            need
        } else {
            let n = needs(batch_rows);
            weights + n.checkpoints + (n.layer + scorer_layer(batch_rows)).max(n.head(1))
        };
        bail!(
            "scoring {rows_note} needs {} (weights {}, checkpoints and one decoder layer's working set {}), but the \
             memory limit is {}; raise `autoquant.memory_limit` or free memory, lower `autoquant.batch_size` or \
             `dataset.calib_seq_len`, or use `autoquant.dtype=bf16`",
            human(need),
            human(weights),
            human(need - weights),
            human(limit)
        )
    }

    /// The peak this plan expects: weights, the kept checkpoints, and the larger of one
    /// layer's and the head's working sets.
    pub fn peak(&self) -> u64 {
        self.weights + self.kept_forwards as u64 * self.checkpoints + self.layer.max(self.head)
    }

    /// The plan as the user sees it (one line).
    pub fn describe(&self) -> String {
        let limit = self.limit.map_or("unknown".to_string(), human);
        let slices = if self.rows < self.batch_rows {
            format!("; batches scored in slices of {} of their {} rows", self.rows, self.batch_rows)
        } else {
            String::new()
        };
        format!(
            "memory plan (limit {limit}): weights {} + checkpoints {} per batch × {} held + max(one decoder layer {}, \
             head in chunks of {} positions {}) = {}{slices}",
            human(self.weights),
            human(self.checkpoints),
            self.kept_forwards,
            human(self.layer),
            self.head_rows,
            human(self.head),
            human(self.peak())
        )
    }
}

/// Parses a memory size: `12GiB`, `512MiB`, `12G`, `1.5 GiB`, or a number of bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| anyhow::anyhow!("`{s}` is not a memory size (e.g. `12GiB`)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => bail!("`{s}`: unknown unit `{other}` (use KiB, MiB, GiB or TiB)"),
    };
    if !value.is_finite() || value <= 0.0 {
        bail!("`{s}` is not a positive memory size");
    }
    Ok((value * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up model: checkpoints 100 per row, layer 1000 per row, head 500 + 10 per
    /// position, 4 positions per row.
    fn needs(rows: usize) -> Needs {
        let r = rows as u64;
        Needs { checkpoints: 100 * r, layer: 1000 * r, head_fixed: 500, head_per_row: 10, linear_io: 0 }
    }

    #[test]
    fn a_roomy_limit_keeps_whole_batches_and_one_head_chunk() {
        let p = Plan::new(Some(1 << 20), 5000, 8, 4, true, &needs, &|_| 0).unwrap();
        assert_eq!((p.rows, p.head_rows, p.checkpoints, p.layer), (8, 32, 800, 8000));
        assert_eq!(p.head, 500 + 320);
        // (limit − weights − layer) / checkpoints
        assert_eq!(p.kept_forwards, ((1 << 20) - 5000 - 8000) / 800);
        assert!(p.peak() <= 1 << 20);
    }

    #[test]
    fn a_tight_limit_slices_rows_and_chunks_the_head() {
        // 5000 + 3·100 + 3·1000 + 7 = 8307 fits three rows, not four (5000 + 400 + 4000).
        let p = Plan::new(Some(8307), 5000, 8, 4, true, &needs, &|r| r as u64 * 2).unwrap();
        assert_eq!((p.rows, p.layer, p.kept_forwards), (3, 3006, 1));
        // head: (8307 − 5300 − 500) / 10 = 250 positions, capped at the slice's 12 (not a
        // multiple of anything: chunk boundaries fall anywhere)
        assert_eq!(p.head_rows, 12);
        assert!(p.peak() <= 8307, "{}", p.peak());
        // Head-bound: a big vocabulary leaves room for 7 positions per chunk.
        let wide = |rows: usize| Needs { head_per_row: 400, layer: 100 * rows as u64, ..needs(rows) };
        let p = Plan::new(Some(5000 + 800 + 500 + 7 * 400 + 399), 5000, 8, 4, true, &wide, &|_| 0).unwrap();
        assert_eq!((p.rows, p.head_rows), (8, 7));
        assert!(p.describe().contains("head in chunks of 7 positions"), "{}", p.describe());
    }

    #[test]
    fn slices_are_as_even_as_they_go() {
        // Room for 7 rows of 8: two slices of 4.
        let limit = 5000 + 7 * 100 + 7 * 1000;
        let p = Plan::new(Some(limit), 5000, 8, 4, true, &needs, &|_| 0).unwrap();
        assert_eq!(p.rows, 4);
        // Room for 5 of 11: three slices of 4.
        let p = Plan::new(Some(5000 + 5 * 1100), 5000, 11, 4, true, &needs, &|_| 0).unwrap();
        assert_eq!(p.rows, 4);
    }

    #[test]
    fn refusals_say_how_much_one_row_needs() {
        let e = Plan::new(Some(6000), 5000, 8, 4, true, &needs, &|_| 0).unwrap_err().to_string();
        // 5000 + 100 + max(1000, 510) = 6100 B
        assert!(e.contains("one row of a batch") && e.contains("autoquant.memory_limit"), "{e}");
        // Not sliceable: the whole batch must fit.
        let e = Plan::new(Some(9000), 5000, 8, 4, false, &needs, &|_| 0).unwrap_err().to_string();
        assert!(e.contains("cannot be sliced"), "{e}");
        assert!(Plan::new(Some(5000 + 800 + 8000 + 820), 5000, 8, 4, false, &needs, &|_| 0).is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("12GiB").unwrap(), 12 << 30);
        assert_eq!(parse_size("1.5 G").unwrap(), 3 << 29);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").unwrap_err().to_string().contains("unknown unit"));
        assert!(parse_size("-3G").is_err() && parse_size("0").is_err());
        assert_eq!(default_limit(Some(10 << 30), 1 << 30), Some((1 << 30) + 9 * (1 << 30)));
        assert_eq!(default_limit(None, 1), None);
    }
}
