//! Fused, multi-threaded CPU kernels for the element-wise parts of the model's forward
//! and backward passes (candle runs each element-wise op single-threaded and allocates
//! per op). Each kernel works on contiguous f32 CPU tensors that autograd does not track
//! and returns `None` otherwise, so callers fall back to the composed candle ops.

use candle_core::Tensor;
use rayon::prelude::*;

/// Rows per rayon task (keeps tasks ≥ ~64 KiB for the sizes here).
const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

pub(super) use qpipe_compute::f32_data::borrow as with_f32;
use qpipe_compute::simd_dispatch;

fn rows_per_task(row: usize) -> usize {
    (MIN_ELEMS_PER_TASK / row.max(1)).max(1)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `e^x` in plain arithmetic, with no libm call, so that loops over it vectorize: Cody–Waite
/// reduction `x = n·ln 2 + r` (|r| ≤ ln 2 / 2), a degree-7 Taylor polynomial of `e^r` (the
/// first omitted term is below 10⁻⁸ relative), then `2^n` applied in two halves so that
/// results in the subnormal range and past `f32::MAX` (∞) come out right. Within 2 ulp of the
/// exact value over the whole f32 range (`tests::exp_is_within_two_ulp`); NaN stays NaN.
/// PyTorch's vectorized CPU `exp` (Sleef, 1 ulp) is no closer to glibc's `expf` than this.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // 355/512: n · LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-110.0, 100.0); // e^-110 rounds to 0, e^100 to ∞; NaN passes
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    // `n` as an integer from the bits of `t` (in [2^23, 2^24), one unit per ulp).
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    let (n1, n2) = (ni >> 1, ni - (ni >> 1));
    p * f32::from_bits(((n1 + 127) as u32) << 23) * f32::from_bits(((n2 + 127) as u32) << 23)
}

simd_dispatch! {
    /// One row of [`masked_softmax`] ([`softmax_row_impl`]).
    fn softmax_row(p: &mut [f32], s: &[f32], m: &[f32], scale: f32, zero_empty_rows: bool) = softmax_row_impl;
}

/// One row of [`masked_softmax`]: `p = softmax(scale·s + mask)`, or the empty-row fill.
#[inline(always)]
fn softmax_row_impl(p: &mut [f32], s: &[f32], m: &[f32], scale: f32, zero_empty_rows: bool) {
    let max = masked_max(s, m, scale);
    if max == f32::NEG_INFINITY {
        let fill = if zero_empty_rows { 0.0 } else { 1.0 / s.len() as f32 };
        p.iter_mut().for_each(|v| *v = fill);
        return;
    }
    for ((p, &x), &mk) in p.iter_mut().zip(s).zip(m) {
        let e = exp(x * scale - max);
        *p = if mk == 0.0 { e } else { 0.0 };
    }
    let sum = lane_sum(p);
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|v| *v *= inv);
}

simd_dispatch! {
    /// [`swiglu`] on one chunk.
    fn swiglu_chunk(o: &mut [f32], g: &[f32], u: &[f32]) = swiglu_chunk_impl;
}

#[inline(always)]
fn swiglu_chunk_impl(o: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

simd_dispatch! {
    /// [`swiglu_backward`] on one chunk.
    fn swiglu_backward_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], da: &[f32]) = swiglu_backward_chunk_impl;
}

#[inline(always)]
fn swiglu_backward_chunk_impl(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], da: &[f32]) {
    for ((((dg, du), &g), &u), &da) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(da) {
        let s = sigmoid(g);
        *du = da * g * s;
        *dg = da * u * s * (1.0 + g * (1.0 - s));
    }
}

simd_dispatch! {
    /// One row of [`cross_entropy_rows`]: writes `w · (softmax(l) − onehot(t))` to `g` and
    /// returns the row's negative log-likelihood.
    fn cross_entropy_row(g: &mut [f32], l: &[f32], t: usize, w: f32) -> f32 = cross_entropy_row_impl;
}

#[inline(always)]
fn cross_entropy_row_impl(g: &mut [f32], l: &[f32], t: usize, w: f32) -> f32 {
    let m = lane_max(l);
    for (g, &x) in g.iter_mut().zip(l) {
        *g = exp(x - m);
    }
    let sum = lane_sum(g);
    let nll = (sum.ln() + m) - l[t];
    let scale = w / sum;
    for g in g.iter_mut() {
        *g *= scale;
    }
    g[t] -= w;
    nll
}

/// `max(v)` in 16 interleaved maxima (NaN skipped, as `f32::max` skips it).
#[inline(always)]
fn lane_max(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    for (l, &x) in lanes.iter_mut().zip(rest) {
        *l = if x > *l { x } else { *l };
    }
    lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `max(scale·s[i])` over the `i` with `mask[i] == 0` (−∞ if none), in 16 interleaved
/// maxima so that the loop vectorizes (one running maximum is a chain of dependent
/// instructions). NaN scores are skipped, as `f32::max` skips them.
#[inline(always)]
fn masked_max(s: &[f32], mask: &[f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let step = |l: &mut [f32; 16], s: &[f32], m: &[f32]| {
        for ((l, &x), &mk) in l.iter_mut().zip(s).zip(m) {
            let v = if mk == 0.0 { x * scale } else { f32::NEG_INFINITY };
            *l = if v > *l { v } else { *l };
        }
    };
    let (sc, mc) = (s.chunks_exact(16), mask.chunks_exact(16));
    let (sr, mr) = (sc.remainder(), mc.remainder());
    for (s, m) in sc.zip(mc) {
        step(&mut lanes, s, m);
    }
    step(&mut lanes, sr, mr);
    lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `Σ v` in 16 interleaved partial sums, so that the loop vectorizes.
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(rest) {
        *a += x;
    }
    acc.iter().sum()
}

/// `silu(g) · u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Option<Tensor> {
    if g.dims() != u.dims() {
        return None;
    }
    let out = with_f32(g, |g| {
        with_f32(u, |u| {
            let mut out = vec![0f32; g.len()];
            out.par_chunks_mut(MIN_ELEMS_PER_TASK)
                .zip(g.par_chunks(MIN_ELEMS_PER_TASK).zip(u.par_chunks(MIN_ELEMS_PER_TASK)))
                .for_each(|(o, (g, u))| swiglu_chunk(o, g, u));
            out
        })
    })??;
    Tensor::from_vec(out, g.shape(), g.device()).ok()
}

/// Backward of [`swiglu`]: `(dg, du) = (da·u·silu'(g), da·silu(g))`.
pub fn swiglu_backward(g: &Tensor, u: &Tensor, da: &Tensor) -> Option<(Tensor, Tensor)> {
    if g.dims() != u.dims() || g.dims() != da.dims() {
        return None;
    }
    let (dg, du) = with_f32(g, |g| {
        with_f32(u, |u| {
            with_f32(da, |da| {
                let mut dg = vec![0f32; g.len()];
                let mut du = vec![0f32; g.len()];
                let c = MIN_ELEMS_PER_TASK;
                dg.par_chunks_mut(c)
                    .zip(du.par_chunks_mut(c))
                    .zip(g.par_chunks(c).zip(u.par_chunks(c)).zip(da.par_chunks(c)))
                    .for_each(|((dg, du), ((g, u), da))| swiglu_backward_chunk(dg, du, g, u, da));
                (dg, du)
            })
        })
    })???;
    let dg = Tensor::from_vec(dg, g.shape(), g.device()).ok()?;
    let du = Tensor::from_vec(du, g.shape(), g.device()).ok()?;
    Some((dg, du))
}

/// Per-head RMSNorm, `[N·heads, D] → [B, heads, T, D]` and rotate-half RoPE in one pass:
/// `rope(rms_norm(raw, w, eps).reshape(B, T, heads, D).transpose(1, 2), cos, sin)` with the
/// arithmetic of candle-nn's `rms_norm` and `rope` (sum of squares in order, `x / m · w`,
/// `x₁·cos − x₂·sin`, `x₁·sin + x₂·cos`), so the same values, without the intermediate
/// tensors and the single-threaded transposing copy. `cos`/`sin` are `[T, D/2]`.
pub fn qk_norm_rope(
    raw: &Tensor,
    w: &Tensor,
    eps: f64,
    cos: &Tensor,
    sin: &Tensor,
    (b, t, heads): (usize, usize, usize),
) -> Option<Tensor> {
    let (rows, d) = raw.dims2().ok()?;
    // Tables `[T, D/2]` shared by the rows, or `[B, T, D/2]` per row (M-RoPE with images).
    let per_row = cos.dims() == [b, t, d / 2] && sin.dims() == [b, t, d / 2];
    if rows != b * t * heads
        || w.dims() != [d]
        || d % 2 != 0
        || !(per_row || (cos.dims() == [t, d / 2] && sin.dims() == [t, d / 2]))
    {
        return None;
    }
    let out = with_f32(raw, |raw| {
        with_f32(w, |w| {
            with_f32(cos, |cos| {
                with_f32(sin, |sin| {
                    let mut out = vec![0f32; raw.len()];
                    // One task per (batch, head): its T output rows are contiguous.
                    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
                        let (bi, h) = (bh / heads, bh % heads);
                        for (ti, o) in o.chunks_mut(d).enumerate() {
                            let src = &raw[((bi * t + ti) * heads + h) * d..][..d];
                            let cs = if per_row { (bi * t + ti) * (d / 2) } else { ti * (d / 2) };
                            norm_rope_row(o, src, w, eps as f32, &cos[cs..cs + d / 2], &sin[cs..cs + d / 2]);
                        }
                    });
                    out
                })
            })
        })
    })????;
    Tensor::from_vec(out, (b, heads, t, d), raw.device()).ok()
}

/// One row of [`qk_norm_rope`].
#[inline]
fn norm_rope_row(o: &mut [f32], src: &[f32], w: &[f32], eps: f32, cos: &[f32], sin: &[f32]) {
    let d = src.len();
    let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / d as f32 + eps).sqrt();
    let half = d / 2;
    for i in 0..half {
        let x1 = src[i] / m * w[i];
        let x2 = src[i + half] / m * w[i + half];
        o[i] = x1 * cos[i] - x2 * sin[i];
        o[i + half] = x1 * sin[i] + x2 * cos[i];
    }
}

/// Backward of RMSNorm over the last dim (see [`crate::ops::rms_norm_backward`]).
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Option<Tensor> {
    let h = *x.dims().last()?;
    if x.dims() != dy.dims() || w.dims() != [h] {
        return None;
    }
    let out = with_f32(x, |x| {
        with_f32(w, |w| {
            with_f32(dy, |dy| {
                let mut dx = vec![0f32; x.len()];
                let c = rows_per_task(h) * h;
                dx.par_chunks_mut(c).zip(x.par_chunks(c).zip(dy.par_chunks(c))).for_each(|(dx, (x, dy))| {
                    for ((dx, x), dy) in dx.chunks_mut(h).zip(x.chunks(h)).zip(dy.chunks(h)) {
                        let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
                        let r = 1.0 / (ms + eps as f32).sqrt();
                        let dot = x.iter().zip(dy).zip(w).map(|((x, dy), w)| x * dy * w).sum::<f32>() / h as f32;
                        let k = r * r * r * dot;
                        for i in 0..h {
                            dx[i] = r * dy[i] * w[i] - x[i] * k;
                        }
                    }
                });
                dx
            })
        })
    })???;
    Tensor::from_vec(out, x.shape(), x.device()).ok()
}

/// Backward of softmax over the last dim given its output `p`: `p·(dp − Σ dp·p)`.
pub fn softmax_backward(p: &Tensor, dp: &Tensor) -> Option<Tensor> {
    let n = *p.dims().last()?;
    if p.dims() != dp.dims() {
        return None;
    }
    let out = with_f32(p, |p| {
        with_f32(dp, |dp| {
            let mut ds = vec![0f32; p.len()];
            let c = rows_per_task(n) * n;
            ds.par_chunks_mut(c).zip(p.par_chunks(c).zip(dp.par_chunks(c))).for_each(|(ds, (p, dp))| {
                for ((ds, p), dp) in ds.chunks_mut(n).zip(p.chunks(n)).zip(dp.chunks(n)) {
                    let dot = p.iter().zip(dp).map(|(a, b)| a * b).sum::<f32>();
                    for i in 0..n {
                        ds[i] = p[i] * (dp[i] - dot);
                    }
                }
            });
            ds
        })
    })??;
    Tensor::from_vec(out, p.shape(), p.device()).ok()
}

/// Shifted cross-entropy on `[n, v]` logits rows with per-row target and weight (0 =
/// ignored): returns `(Σ weight·nll, dlogits)` with `dlogits = weight·(softmax − onehot)`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Option<(f64, Tensor)> {
    let (n, v) = logits.dims2().ok()?;
    if targets.len() != n || weights.len() != n {
        return None;
    }
    let (loss, grad) = with_f32(logits, |l| {
        let mut grad = vec![0f32; l.len()];
        let c = rows_per_task(v);
        let loss = qpipe_compute::par::ordered_sum(
            grad.par_chunks_mut(c * v).zip(l.par_chunks(c * v)).enumerate().map(|(ci, (g, l))| {
                let mut loss = 0f64;
                for (ri, (g, l)) in g.chunks_mut(v).zip(l.chunks(v)).enumerate() {
                    let row = ci * c + ri;
                    let w = weights[row];
                    if w == 0.0 {
                        continue;
                    }
                    loss += f64::from(w) * f64::from(cross_entropy_row(g, l, targets[row] as usize, w));
                }
                loss
            }),
        );
        (loss, grad)
    })?;
    Some((loss, Tensor::from_vec(grad, (n, v), logits.device()).ok()?))
}

/// Masked, scaled softmax over the last dim of attention scores `s: [B, Hkv, G, T, T]`
/// with the additive mask `[B, 1, 1, T, T]` (0 = visible, anything else = masked):
/// `softmax(scale·s + mask)`. Rows with no visible key become 0 (`zero_empty_rows`, SDPA)
/// or uniform over all keys (eager's `finfo.min` mask).
pub fn masked_softmax(s: &Tensor, scale: f32, mask: &Tensor, zero_empty_rows: bool) -> Option<Tensor> {
    let &[b, hkv, g, t, t2] = s.dims() else { return None };
    if t != t2 || mask.dims() != [b, 1, 1, t, t] {
        return None;
    }
    let out = with_f32(s, |s| {
        with_f32(mask, |mask| {
            let mut p = vec![0f32; s.len()];
            let per_batch = hkv * g * t * t;
            let c = rows_per_task(t) * t;
            p.par_chunks_mut(c).zip(s.par_chunks(c)).enumerate().for_each(|(ci, (p, s))| {
                for (ri, (p, s)) in p.chunks_mut(t).zip(s.chunks(t)).enumerate() {
                    let flat = ci * c + ri * t; // offset of this row in s
                    let (bi, qi) = (flat / per_batch, (flat / t) % t);
                    let m = &mask[(bi * t + qi) * t..(bi * t + qi + 1) * t];
                    softmax_row(p, s, m, scale, zero_empty_rows);
                }
            });
            p
        })
    })??;
    Tensor::from_vec(out, s.shape(), s.device()).ok()
}

/// Whether every value is finite (`None` when the fast path does not apply).
pub fn all_finite(t: &Tensor) -> Option<bool> {
    with_f32(t, |v| v.par_chunks(MIN_ELEMS_PER_TASK).all(|c| c.iter().all(|x| x.is_finite())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp() {
        // Every 97th f32 from −110 to 100 (about 22 million values), against f64.
        let (lo, hi) = (-110f32, 100f32);
        let mut worst = (0u32, 0f32);
        let mut check = |x: f32| {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            let d = ulps(got, want);
            assert!(
                d <= 2 || (want < f32::MIN_POSITIVE && (got - want).abs() <= 2.0 * 1.4e-45),
                "exp({x}) = {got}, want {want}"
            );
            if d > worst.0 && want >= f32::MIN_POSITIVE {
                worst = (d, x);
            }
        };
        for bits in (0..=(-lo).to_bits()).step_by(97) {
            check(-f32::from_bits(bits));
        }
        for bits in (0..hi.to_bits()).step_by(97) {
            check(f32::from_bits(bits));
        }
        for x in [0.0, -0.0, 1.0, -1.0, 88.7, 88.73, -87.3, -103.9, -104.0, lo, hi] {
            check(x);
        }
        assert_eq!(exp(200.0), f32::INFINITY);
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        eprintln!("exp: worst {} ulp at {}", worst.0, worst.1);
    }

    /// The AVX-512 builds of the kernels give the bits of the baseline builds (on a CPU
    /// without AVX-512 both calls run the baseline build and the test checks nothing more).
    #[test]
    fn avx512_kernels_give_the_baseline_bits() {
        let n = 1000; // not a multiple of 16: remainders too
        let v = |k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37 + k).sin() * 9.0).collect() };
        let (g, u, da) = (v(0.0), v(1.0), v(2.0));
        let mask: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { f32::MIN } else { 0.0 }).collect();
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        softmax_row(&mut a, &g, &mask, 0.125, true);
        softmax_row_impl(&mut b, &g, &mask, 0.125, true);
        assert_eq!(bits(&a), bits(&b), "softmax");
        swiglu_chunk(&mut a, &g, &u);
        swiglu_chunk_impl(&mut b, &g, &u);
        assert_eq!(bits(&a), bits(&b), "swiglu");
        let (mut a2, mut b2) = (vec![0f32; n], vec![0f32; n]);
        swiglu_backward_chunk(&mut a, &mut a2, &g, &u, &da);
        swiglu_backward_chunk_impl(&mut b, &mut b2, &g, &u, &da);
        assert_eq!((bits(&a), bits(&a2)), (bits(&b), bits(&b2)), "swiglu backward");
        let (la, lb) = (cross_entropy_row(&mut a, &g, 7, 0.5), cross_entropy_row_impl(&mut b, &g, 7, 0.5));
        assert_eq!((la.to_bits(), bits(&a)), (lb.to_bits(), bits(&b)), "cross-entropy");
    }

    /// The fused per-head norm + layout + RoPE gives candle-nn's bits.
    #[test]
    fn qk_norm_rope_equals_the_composed_ops() {
        let dev = candle_core::Device::Cpu;
        let (b, t, heads, d) = (2, 5, 3, 8);
        let raw = Tensor::randn(0f32, 2.0, (b * t * heads, d), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, d, &dev).unwrap();
        let (cos, sin) = crate::ops::rope_tables(t, d, 10000.0, candle_core::DType::F32, &dev).unwrap();
        let want = candle_nn::ops::rms_norm(&raw, &w, 1e-6)
            .unwrap()
            .reshape((b, t, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let want = candle_nn::rotary_emb::rope(&want, &cos, &sin).unwrap();
        let got = qk_norm_rope(&raw, &w, 1e-6, &cos, &sin, (b, t, heads)).unwrap();
        let bits = |x: &Tensor| {
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(got.dims(), want.dims());
        assert_eq!(bits(&got), bits(&want));
        assert!(qk_norm_rope(&raw, &w, 1e-6, &cos, &sin, (b, t, heads + 1)).is_none());
    }

    #[test]
    fn lane_sum_adds_every_value() {
        for n in [0usize, 1, 15, 16, 17, 100] {
            let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(lane_sum(&v), (n * n.saturating_sub(1) / 2) as f32, "{n}");
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// `cargo test -p qpipe-model --lib bench_masked_softmax -- --ignored --nocapture`:
    /// the attention softmax of one layer of the mid-size benchmark model.
    #[test]
    #[ignore]
    fn bench_masked_softmax() {
        let dev = candle_core::Device::Cpu;
        let s = Tensor::randn(0f32, 1.0, (8, 4, 2, 128, 128), &dev).unwrap();
        // causal
        let m: Vec<f32> = (0..8 * 128 * 128).map(|i| if i % 128 > (i / 128) % 128 { f32::MIN } else { 0.0 }).collect();
        let mask = Tensor::from_vec(m, (8, 1, 1, 128, 128), &dev).unwrap();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t0 = std::time::Instant::now();
            std::hint::black_box(masked_softmax(&s, 0.125, &mask, true).unwrap());
            best = best.min(t0.elapsed().as_secs_f64());
        }
        eprintln!("masked_softmax [8,4,2,128,128]: {:.3} ms", best * 1e3);
    }
}
