//! Rank statistics for comparing sensitivity rankings: Spearman's ρ (average ranks for
//! ties, i.e. the Pearson correlation of the ranks, as `scipy.stats.spearmanr` computes
//! it) and the overlap of the top-k most sensitive layers.

use std::collections::HashMap;

/// 1-based ranks, ties share their average rank.
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    ranks
}

/// Pearson's r; `None` when fewer than two points or either side is constant.
pub fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    if saa == 0.0 || sbb == 0.0 {
        return None;
    }
    Some((sab / (saa * sbb).sqrt()).clamp(-1.0, 1.0))
}

/// Spearman's ρ of paired samples; `None` when undefined (see [`pearson`]).
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    pearson(&average_ranks(a), &average_ranks(b))
}

/// The values of the names both sides have, paired, in `a`'s order.
pub fn paired(a: &[(String, f64)], b: &[(String, f64)]) -> (Vec<f64>, Vec<f64>) {
    let bm: HashMap<&str, f64> = b.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    a.iter().filter_map(|(k, v)| bm.get(k.as_str()).map(|w| (*v, *w))).unzip()
}

/// Spearman's ρ over the names both sides share.
pub fn spearman_by_name(a: &[(String, f64)], b: &[(String, f64)]) -> Option<f64> {
    let (x, y) = paired(a, b);
    spearman(&x, &y)
}

/// The `k` names with the largest values (descending, ties in input order).
pub fn top_k(values: &[(String, f64)], k: usize) -> Vec<&str> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&i, &j| values[j].1.total_cmp(&values[i].1));
    idx.into_iter().take(k).map(|i| values[i].0.as_str()).collect()
}

/// How many of `a`'s top-k are among `b`'s top-k.
pub fn top_k_overlap(a: &[(String, f64)], b: &[(String, f64)], k: usize) -> usize {
    let tb = top_k(b, k);
    top_k(a, k).iter().filter(|n| tb.contains(n)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(v: &[f64]) -> Vec<(String, f64)> {
        v.iter().enumerate().map(|(i, x)| (format!("l{i}"), *x)).collect()
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(average_ranks(&[10.0, 20.0, 10.0, 5.0]), [2.5, 4.0, 2.5, 1.0]);
    }

    #[test]
    fn spearman_known_values() {
        // scipy.stats.spearmanr([1,2,3,4,5],[5,6,7,8,7]).statistic == 0.8207826816681233
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[5.0, 6.0, 7.0, 8.0, 7.0]).unwrap();
        assert!((r - 0.8207826816681233).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[30.0, 20.0, 10.0]), Some(-1.0));
        // Monotone transforms do not change it.
        assert_eq!(spearman(&[1e-8, 1e-3, 2.0], &[1.0, 2.0, 3.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
    }

    #[test]
    fn by_name_and_top_k() {
        let a = named(&[0.9, 0.1, 0.5, 0.7]);
        let mut b = named(&[0.8, 0.2, 0.6, 0.1]);
        b.reverse();
        assert_eq!(top_k(&a, 2), ["l0", "l3"]);
        assert_eq!(top_k_overlap(&a, &b, 2), 1);
        assert_eq!(top_k_overlap(&a, &a, 10), 4);
        let r = spearman_by_name(&a, &b).unwrap();
        assert!((r - 0.4).abs() < 1e-12, "{r}");
    }
}
