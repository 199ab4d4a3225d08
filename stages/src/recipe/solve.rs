//! The exact mixed-precision search: one option per recipe group (a pair's format, or
//! NONE), minimizing the summed score under a weight-size budget — a multiple-choice
//! knapsack, solved for *every* budget at once.
//!
//! [`front`] computes the Pareto front of (total cost, total score): for each stage (group)
//! the set of partial solutions that no other beats on both, built from the previous one
//! by adding each of the group's options and merging. A group's dominated options (another
//! at most as costly with a lower score) are dropped first: what is left per group is at
//! most one option per distinct cost (4, 4.5, 8 and 16 bits in practice), so each step is a
//! merge of a few sorted lists. The best solution for a budget is the last front point
//! whose cost fits ([`best_within`]) — exact, as every optimum lies on the front. Tests
//! check it against brute force.

/// One group's options: `(score, cost)`.
pub type Options = Vec<(f64, f64)>;

/// A point of the Pareto front: the cheapest way to reach its score, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub cost: f64,
    pub score: f64,
    /// Per group, the index of the option taken.
    pub choice: Vec<usize>,
}

/// A partial solution: its totals and how it extends the previous stage's point.
#[derive(Clone, Copy)]
struct St {
    cost: f64,
    score: f64,
    parent: u32,
    option: u32,
}

/// The options of a group that can be part of an optimum, by increasing cost (and strictly
/// decreasing score); ties keep the earlier option.
fn undominated(options: &Options) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..options.len()).collect();
    idx.sort_by(|&a, &b| {
        options[a].1.total_cmp(&options[b].1).then(options[a].0.total_cmp(&options[b].0)).then(a.cmp(&b))
    });
    let mut kept: Vec<usize> = Vec::new();
    for i in idx {
        if kept.last().is_none_or(|&k| options[i].0 < options[k].0) {
            kept.push(i);
        }
    }
    kept
}

/// The Pareto front of all choices (one option per group), by increasing cost and
/// strictly decreasing score. Empty groups make the problem infeasible (an empty front).
pub fn front(groups: &[Options]) -> Vec<Point> {
    if groups.iter().any(Vec::is_empty) {
        return Vec::new();
    }
    let mut stages: Vec<Vec<St>> = Vec::with_capacity(groups.len() + 1);
    stages.push(vec![St { cost: 0.0, score: 0.0, parent: u32::MAX, option: u32::MAX }]);
    let mut merged: Vec<St> = Vec::new();
    for g in groups {
        let prev = stages.last().expect("the initial stage");
        let opts = undominated(g);
        // One sorted list per option (the previous front shifted by it); merge by cost.
        let mut heads = vec![0usize; opts.len()];
        merged.clear();
        loop {
            let mut best: Option<(usize, f64, f64)> = None;
            for (k, &o) in opts.iter().enumerate() {
                let Some(s) = prev.get(heads[k]) else { continue };
                let (c, sc) = (s.cost + g[o].1, s.score + g[o].0);
                if best.is_none_or(|(_, bc, bs)| c < bc || (c == bc && sc < bs)) {
                    best = Some((k, c, sc));
                }
            }
            let Some((k, cost, score)) = best else { break };
            let parent = heads[k];
            heads[k] += 1;
            if merged.last().is_none_or(|m| score < m.score) {
                merged.push(St { cost, score, parent: parent as u32, option: opts[k] as u32 });
            }
        }
        stages.push(merged.clone());
    }
    let last = stages.last().expect("at least the initial stage");
    (0..last.len())
        .map(|mut idx| {
            let p = last[idx];
            let mut choice = vec![0usize; groups.len()];
            for r in (0..groups.len()).rev() {
                let s = stages[r + 1][idx];
                choice[r] = s.option as usize;
                idx = s.parent as usize;
            }
            Point { cost: p.cost, score: p.score, choice }
        })
        .collect()
}

/// The best point whose cost is within `max_cost` (a relative 1e-12 absorbs the budget's
/// own rounding); `None` when even the cheapest is over.
pub fn best_within(front: &[Point], max_cost: f64) -> Option<&Point> {
    let tol = max_cost.abs() * 1e-12;
    front.iter().take_while(|p| p.cost <= max_cost + tol).last()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every choice, the best score within the budget (with its cost).
    fn brute(groups: &[Options], max_cost: f64) -> Option<(f64, f64)> {
        let mut best: Option<(f64, f64)> = None;
        let mut idx = vec![0usize; groups.len()];
        loop {
            let (s, c) = groups.iter().zip(&idx).fold((0.0, 0.0), |(s, c), (g, &i)| (s + g[i].0, c + g[i].1));
            if c <= max_cost && best.is_none_or(|(bs, bc)| s < bs || (s == bs && c < bc)) {
                best = Some((s, c));
            }
            let mut k = 0;
            loop {
                if k == groups.len() {
                    return best;
                }
                idx[k] += 1;
                if idx[k] < groups[k].len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
        }
    }

    /// A small deterministic generator (xorshift), so the cases are the same everywhere.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Groups shaped like the real problem: a weight count per group, options at
    /// 4/4.5/8 bits with random scores (some equal), NONE at 16 bits and score 0.
    fn case(rng: &mut Rng, n: usize, formats: usize) -> Vec<Options> {
        (0..n)
            .map(|_| {
                let numel = [64.0, 96.0, 128.0, 256.0][(rng.next() * 4.0) as usize];
                let mut o: Options = (0..formats)
                    .map(|_| {
                        let bits = [4.0, 4.5, 8.0][(rng.next() * 3.0) as usize];
                        let score = if rng.next() < 0.1 { 1.0 } else { (rng.next() * 8.0).exp() * 1e-3 };
                        (score, numel * bits / 16.0)
                    })
                    .collect();
                o.push((0.0, numel));
                o
            })
            .collect()
    }

    #[test]
    fn the_front_holds_the_brute_force_optimum_of_every_budget() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for trial in 0..60 {
            let (n, f) = (1 + trial % 6, 1 + trial % 4);
            let groups = case(&mut rng, n, f);
            let fr = front(&groups);
            // Sorted by cost, strictly better scores, choices that add up.
            for w in fr.windows(2) {
                assert!(w[0].cost < w[1].cost && w[0].score > w[1].score, "trial {trial}");
            }
            for p in &fr {
                let (s, c) = groups.iter().zip(&p.choice).fold((0.0, 0.0), |(s, c), (g, &i)| (s + g[i].0, c + g[i].1));
                assert!((s - p.score).abs() <= 1e-9 * s.abs().max(1.0) && (c - p.cost).abs() < 1e-9, "trial {trial}");
            }
            let total: f64 = groups.iter().map(|g| g.last().unwrap().1).sum();
            for step in 0..=32 {
                let budget = total * step as f64 / 32.0;
                let want = brute(&groups, budget);
                let got = best_within(&fr, budget).map(|p| (p.score, p.cost));
                match (want, got) {
                    (None, None) => {}
                    (Some((ws, wc)), Some((gs, gc))) => {
                        assert!(
                            (ws - gs).abs() <= 1e-9 * ws.abs().max(1.0),
                            "trial {trial} budget {budget}: {ws} vs {gs}"
                        );
                        assert!((wc - gc).abs() < 1e-9, "trial {trial}: cost {wc} vs {gc}");
                    }
                    other => panic!("trial {trial} budget {budget}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn dominated_options_are_dropped_and_ties_keep_the_first() {
        let o: Options = vec![(5.0, 8.0), (6.0, 9.0), (1.0, 8.0), (1.0, 8.0), (0.0, 16.0), (2.0, 4.0)];
        assert_eq!(undominated(&o), vec![5, 2, 4]);
        assert!(front(&[vec![], vec![(0.0, 1.0)]]).is_empty());
    }

    /// `cargo test -p qpipe-stages --lib recipe::solve::tests::timing -- --ignored --nocapture`:
    /// the 4B preset's shape (145 groups) × 16 pairs.
    #[test]
    #[ignore]
    fn timing_4b_shape_16_pairs() {
        let mut rng = Rng(7);
        // 36 layers × (q/k/v, o, gate/up, down) + lm_head, weight counts of Qwen3-VL-4B.
        let kinds = [2560.0 * 6144.0, 4096.0 * 2560.0, 2560.0 * 19456.0, 9728.0 * 2560.0];
        let mut groups: Vec<Options> = Vec::new();
        for l in 0..145 {
            let numel = if l == 144 { 2560.0 * 151936.0 } else { kinds[l % 4] };
            let mut o: Options = (0..16)
                .map(|p| {
                    let bits = [4.0, 4.5, 8.0, 8.0][p % 4];
                    ((rng.next() * 10.0).exp() * 1e-4, numel * bits / 16.0)
                })
                .collect();
            o.push((0.0, numel));
            groups.push(o);
        }
        let t0 = std::time::Instant::now();
        let fr = front(&groups);
        eprintln!("145 groups x 17 options: front of {} points in {:.3} s", fr.len(), t0.elapsed().as_secs_f64());
    }
}
