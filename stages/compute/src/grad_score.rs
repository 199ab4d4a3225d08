//! ModelOpt's gradient score term, `Σ clamp(g·d, ±1e10)²` (`_get_auto_quantize_score`):
//! each term in f32, as ModelOpt computes it, accumulated in f64. The one definition the
//! scorer's paths share (the integer-product kernel of `qpipe-quant` evaluates the same
//! term in AVX-512 registers; its tests compare it with [`term`]).

use rayon::prelude::*;

use crate::par::ordered_sum;
use crate::simd_dispatch;

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

/// One term: `clamp(g·d, ±1e10)²`, the product and square in f32, widened to f64.
#[inline(always)]
pub fn term(g: f32, d: f32) -> f64 {
    let x = (g * d).clamp(-1e10, 1e10);
    f64::from(x * x)
}

simd_dispatch! {
    /// [`sum_diff`] on one chunk.
    fn diff_chunk(g: &[f32], a: &[f32], b: &[f32]) -> f64 = diff_chunk_impl;
}

/// `Σ term(g, a − b)` in 8 interleaved partial sums (so that the loop vectorizes).
#[inline(always)]
fn diff_chunk_impl(g: &[f32], a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (gc, ac, bc) = (g.chunks_exact(8), a.chunks_exact(8), b.chunks_exact(8));
    let (gr, ar, br) = (gc.remainder(), ac.remainder(), bc.remainder());
    for ((g, a), b) in gc.zip(ac).zip(bc) {
        for i in 0..8 {
            acc[i] += term(g[i], a[i] - b[i]);
        }
    }
    for i in 0..gr.len() {
        acc[i] += term(gr[i], ar[i] - br[i]);
    }
    acc.iter().sum()
}

simd_dispatch! {
    /// [`sum_product`] on one chunk.
    fn product_chunk(g: &[f32], d: &[f32]) -> f64 = product_chunk_impl;
}

/// `Σ term(g, d)` in 8 interleaved partial sums, as [`diff_chunk_impl`].
#[inline(always)]
fn product_chunk_impl(g: &[f32], d: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (gc, dc) = (g.chunks_exact(8), d.chunks_exact(8));
    let (gr, dr) = (gc.remainder(), dc.remainder());
    for (g, d) in gc.zip(dc) {
        for i in 0..8 {
            acc[i] += term(g[i], d[i]);
        }
    }
    for i in 0..gr.len() {
        acc[i] += term(gr[i], dr[i]);
    }
    acc.iter().sum()
}

/// `Σ clamp(g·(a − b), ±1e10)²` over equally long slices (`g` = dL/dY, `a` = Y_q, `b` = Y),
/// in parallel chunks of a fixed size, their sums combined in order.
pub fn sum_diff(g: &[f32], a: &[f32], b: &[f32]) -> f64 {
    assert!(g.len() == a.len() && g.len() == b.len(), "sum_diff: lengths {} {} {}", g.len(), a.len(), b.len());
    ordered_sum(
        g.par_chunks(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).map(|(g, (a, b))| diff_chunk(g, a, b)),
    )
}

/// `Σ clamp(g·d, ±1e10)²` over equally long slices (`d` = Y_q − Y formed elsewhere), as
/// [`sum_diff`] does.
pub fn sum_product(g: &[f32], d: &[f32]) -> f64 {
    assert_eq!(g.len(), d.len(), "sum_product: lengths differ");
    ordered_sum(g.par_chunks(CHUNK).zip(d.par_chunks(CHUNK)).map(|(g, d)| product_chunk(g, d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_clamp_before_squaring_in_f32() {
        assert_eq!(term(2.0, 1.5), 9.0);
        let big = f64::from(1e10f32 * 1e10f32);
        assert_eq!(term(1e6, 1e6), big);
        assert_eq!(term(-1e6, 1e6), big);
        assert!(term(f32::NAN, 1.0).is_nan());
    }

    /// The AVX-512 build of the chunk gives the baseline build's bits.
    #[test]
    fn dispatch_gives_the_baseline_bits() {
        let v = |k: f32| -> Vec<f32> { (0..1037).map(|i| (i as f32 * 0.37 + k).sin() * 9.0).collect() };
        let (g, a, b) = (v(0.0), v(1.0), v(2.0));
        assert_eq!(diff_chunk(&g, &a, &b).to_bits(), diff_chunk_impl(&g, &a, &b).to_bits());
    }

    #[test]
    fn sums_match_a_plain_loop() {
        let n = 3 * CHUNK + 13;
        let g: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let a: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 / 100.0).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i * 31) % 101) as f32 / 10.0).collect();
        let d: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a - b).collect();
        let want: f64 = g.iter().zip(&d).map(|(g, d)| term(*g, *d)).sum();
        let (s1, s2) = (sum_diff(&g, &a, &b), sum_product(&g, &d));
        assert!((s1 - want).abs() <= 1e-12 * want, "{s1} vs {want}");
        assert!((s2 - want).abs() <= 1e-12 * want, "{s2} vs {want}");
    }
}
