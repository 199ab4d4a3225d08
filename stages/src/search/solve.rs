//! The effective-bits search that fills `best`, as ModelOpt `auto_quantize` does it.
//!
//! * `gradient`: ModelOpt solves `min Σ score` subject to `Σ cost ≤ total × bits / 16`,
//!   one choice per recipe, with PuLP/CBC. That integer program is a multiple-choice
//!   knapsack; qpipe solves it exactly with a Pareto-front dynamic program over
//!   (cost, score) states. Ties (equal total score) go to the lower total cost, then to
//!   the earlier choice in format order (the quantized format before NONE).
//!   An infeasible budget is an error, as ModelOpt's `_verify_resolved_constraint` raises.
//! * `kl_div`: ModelOpt's 100-step threshold bisection on the score, verbatim.

use anyhow::{bail, Result};

/// One recipe's candidates, in format order (quantized formats first, NONE last).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    pub scores: Vec<f64>,
    pub costs: Vec<f64>,
}

/// What the search chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Index into each recipe's candidates.
    pub choice: Vec<usize>,
    /// Σ selected scores (summed in recipe order, as ModelOpt does).
    pub score: f64,
    /// Σ selected costs.
    pub cost: f64,
    pub is_satisfied: bool,
}

fn finish(cands: &[Candidates], choice: Vec<usize>, max_cost: f64, is_satisfied: Option<bool>) -> Selection {
    let mut score = 0.0;
    let mut cost = 0.0;
    for (c, &i) in cands.iter().zip(&choice) {
        score += c.scores[i];
        cost += c.costs[i];
    }
    let is_satisfied = is_satisfied.unwrap_or(cost <= max_cost);
    Selection { choice, score, cost, is_satisfied }
}

/// ModelOpt's gradient search (an exact multiple-choice knapsack).
pub fn knapsack(cands: &[Candidates], max_cost: f64) -> Result<Selection> {
    // Cost sums are sums of integers or simple fractions of weight counts: exact in f64 up
    // to 2^53. A small relative tolerance absorbs the budget's own rounding.
    let tol = max_cost.abs() * 1e-12;
    let min_possible: f64 = cands.iter().map(|c| c.costs.iter().cloned().fold(f64::INFINITY, f64::min)).sum();
    if min_possible > max_cost + tol {
        bail!(
            "the effective-bits budget ({max_cost} weight units) is below the cheapest choice of every recipe \
             ({min_possible}); raise `autoquant.effective_bits`"
        );
    }
    // State: (cost, score, back pointer into the previous stage's front, choice).
    #[derive(Clone, Copy)]
    struct St {
        cost: f64,
        score: f64,
        parent: usize,
        choice: usize,
    }
    let mut stages: Vec<Vec<St>> = Vec::with_capacity(cands.len());
    let mut front = vec![St { cost: 0.0, score: 0.0, parent: usize::MAX, choice: usize::MAX }];
    // The cheapest completion of the remaining recipes, to prune states that cannot fit.
    let mut rest_min = vec![0.0; cands.len() + 1];
    for i in (0..cands.len()).rev() {
        rest_min[i] = rest_min[i + 1] + cands[i].costs.iter().cloned().fold(f64::INFINITY, f64::min);
    }
    for (r, c) in cands.iter().enumerate() {
        let mut next: Vec<St> = Vec::with_capacity(front.len() * c.scores.len());
        for (pi, s) in front.iter().enumerate() {
            for (ci, (&sc, &co)) in c.scores.iter().zip(&c.costs).enumerate() {
                let cost = s.cost + co;
                if cost + rest_min[r + 1] > max_cost + tol {
                    continue;
                }
                next.push(St { cost, score: s.score + sc, parent: pi, choice: ci });
            }
        }
        // Pareto front: sort by cost (then score, then choice order), keep strictly better scores.
        next.sort_by(|a, b| {
            a.cost
                .total_cmp(&b.cost)
                .then(a.score.total_cmp(&b.score))
                .then(a.choice.cmp(&b.choice))
                .then(a.parent.cmp(&b.parent))
        });
        let mut kept: Vec<St> = Vec::with_capacity(next.len());
        for s in next {
            if kept.last().is_none_or(|k: &St| s.score < k.score) {
                kept.push(s);
            }
        }
        stages.push(std::mem::replace(&mut front, kept));
    }
    stages.push(front);
    // Best: the lowest score; on equal score the lowest cost (first in the front).
    let last = stages.last().expect("at least the initial stage");
    let (mut idx, _) = last
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.score.total_cmp(&b.1.score).then(a.1.cost.total_cmp(&b.1.cost)))
        .expect("a feasible state exists");
    let mut choice = vec![0; cands.len()];
    for r in (0..cands.len()).rev() {
        let s = stages[r + 1][idx];
        choice[r] = s.choice;
        idx = s.parent;
    }
    Ok(finish(cands, choice, max_cost, Some(true)))
}

/// ModelOpt's `kl_div` search: bisect a score threshold for 100 iterations; each recipe takes
/// the first candidate (in format order) whose score is ≤ the threshold.
///
/// One deliberate difference: ModelOpt returns the selection of its *last probe*. Once the
/// bisection has converged to adjacent floats, whether that probe lands on the satisfying
/// side depends on the last bit of the boundary score (`(lo + hi) / 2` rounds to `lo` or
/// `hi`), so ModelOpt can report `is_satisfied: false` for a feasible budget. qpipe
/// returns the selection at the converged upper bound `hi` (the smallest threshold seen to
/// satisfy the budget, initially the max score) when it satisfies the budget — the same as
/// ModelOpt whenever ModelOpt's last probe satisfies it.
pub fn threshold(cands: &[Candidates], max_cost: f64) -> Selection {
    let all: Vec<f64> = cands.iter().flat_map(|c| c.scores.iter().copied()).collect();
    if all.is_empty() {
        return Selection { choice: vec![], score: 0.0, cost: 0.0, is_satisfied: false };
    }
    let select = |t: f64| -> (Vec<usize>, f64) {
        let mut total = 0.0;
        let choice = cands
            .iter()
            .map(|c| {
                let i = c.scores.iter().position(|&s| s <= t).unwrap_or(0);
                total += c.costs[i];
                i
            })
            .collect();
        (choice, total)
    };
    let min = all.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = all.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (mut lo, mut hi) = (min, max);
    let mut t = (min + max) / 2.0;
    let (mut choice, mut total) = (vec![], 0.0);
    for _ in 0..100 {
        (choice, total) = select(t);
        if total <= max_cost {
            hi = t;
        } else {
            lo = t;
        }
        t = (lo + hi) / 2.0;
    }
    // `hi` is the smallest threshold known to satisfy the budget (or the max score, where
    // every recipe takes its first, most compressed, choice).
    let (c_hi, t_hi) = select(hi);
    if t_hi <= max_cost {
        (choice, total) = (c_hi, t_hi);
    }
    finish(cands, choice, max_cost, Some(total <= max_cost))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two(q: f64, full: f64) -> Candidates {
        Candidates { scores: vec![q, 0.0], costs: vec![full / 4.0, full] }
    }

    /// Brute force over all choices, for checking the DP.
    fn brute(c: &[Candidates], max_cost: f64) -> f64 {
        let n = c.len();
        let mut best = f64::INFINITY;
        for mask in 0..(1u32 << n) {
            let (mut s, mut k) = (0.0, 0.0);
            for (i, ci) in c.iter().enumerate() {
                let j = ((mask >> i) & 1) as usize;
                s += ci.scores[j];
                k += ci.costs[j];
            }
            if k <= max_cost && s < best {
                best = s;
            }
        }
        best
    }

    #[test]
    fn all_quantized_when_budget_is_the_format() {
        let c = vec![two(3.0, 64.0), two(1.0, 32.0), two(2.0, 16.0)];
        let total: f64 = 112.0;
        let s = knapsack(&c, total * 4.0 / 16.0).unwrap();
        assert_eq!(s.choice, [0, 0, 0]);
        assert_eq!(s.score, 6.0);
        assert!(s.is_satisfied);
    }

    #[test]
    fn keeps_the_most_sensitive_unquantized_within_budget() {
        let c = vec![two(3.0, 64.0), two(1.0, 32.0), two(2.0, 16.0), two(0.5, 16.0)];
        // Budget lets exactly 32 extra units stay at 16 bits: 16.0 + 16.0 (recipes 2 and 3, score 2.5)
        // or recipe 1 (score 1.0): the DP keeps 2 and 3 unquantized.
        let max = (64.0 + 32.0 + 16.0 + 16.0) / 4.0 + 24.0;
        let s = knapsack(&c, max).unwrap();
        assert_eq!(s.choice, [0, 0, 1, 1]);
        assert_eq!(s.score, 4.0);
        assert_eq!(s.score, brute(&c, max));
    }

    #[test]
    fn dp_equals_brute_force() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        for _ in 0..50 {
            let c: Vec<_> = (0..10).map(|_| two(rnd(), (1.0 + (rnd() * 8.0).floor()) * 16.0)).collect();
            let total: f64 = c.iter().map(|c| c.costs[1]).sum();
            let max = total * (4.0 + rnd() * 12.0) / 16.0;
            let s = knapsack(&c, max).unwrap();
            assert!((s.score - brute(&c, max)).abs() < 1e-12);
            assert!(s.cost <= max);
        }
    }

    #[test]
    fn infeasible_budget_is_an_error() {
        let c = vec![two(1.0, 64.0)];
        let e = knapsack(&c, 8.0).unwrap_err().to_string();
        assert!(e.contains("effective_bits"), "{e}");
    }

    #[test]
    fn threshold_search_selects_by_score() {
        let c = vec![two(3.0, 64.0), two(1.0, 32.0), two(2.0, 16.0)];
        let all_q = knapsack(&c, 28.0).unwrap();
        let t = threshold(&c, 28.0);
        assert_eq!(t.choice, all_q.choice);
        assert!(t.is_satisfied);
        // A generous budget leaves everything unquantized (score 0 ≤ any threshold).
        let t = threshold(&c, 112.0);
        assert_eq!(t.choice, [1, 1, 1]);
    }

    #[test]
    fn threshold_search_ends_on_the_satisfying_side() {
        // The budget is met only when every recipe is quantized, i.e. at threshold = max score;
        // the bisection approaches it from below and must still report the satisfying choice.
        for top in [0.1679541707038879, 0.16797524690628052, 0.3, 1.0 / 3.0] {
            let c = vec![two(top, 64.0), two(0.05, 32.0), two(0.01, 16.0)];
            let t = threshold(&c, 28.0);
            assert_eq!(t.choice, [0, 0, 0], "top score {top}");
            assert!(t.is_satisfied);
        }
    }
}
