//! Fused, multi-threaded CPU kernels for the element-wise parts of the model's forward
//! and backward passes (candle runs each element-wise op single-threaded and allocates
//! per op). Each kernel works on contiguous f32 CPU tensors that autograd does not track
//! and returns `None` otherwise, so callers fall back to the composed candle ops.

use candle_core::Tensor;
use rayon::prelude::*;

/// Rows per rayon task (keeps tasks ≥ ~64 KiB for the sizes here).
const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

pub(super) use crate::cpu_f32::borrow as with_f32;

fn rows_per_task(row: usize) -> usize {
    (MIN_ELEMS_PER_TASK / row.max(1)).max(1)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `e^x` in plain arithmetic, with no libm call, so that loops over it vectorize: Cody–Waite
/// reduction `x = n·ln 2 + r` (|r| ≤ ln 2 / 2), a degree-7 Taylor polynomial of `e^r` (the
/// first omitted term is below 10⁻⁸ relative), then `2^n` applied in two halves so that
/// results in the subnormal range and past `f32::MAX` (∞) come out right. Within 2 ulp of the
/// exact value over the whole f32 range (`tests::exp_is_within_two_ulp`); NaN stays NaN.
/// PyTorch's vectorized CPU `exp` (Sleef, 1 ulp) is no closer to glibc's `expf` than this.
#[inline]
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

/// `Σ v` in 16 interleaved partial sums, so that the loop vectorizes.
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
                .for_each(|(o, (g, u))| {
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = g * sigmoid(g) * u;
                    }
                });
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
                    .for_each(|((dg, du), ((g, u), da))| {
                        for i in 0..g.len() {
                            let s = sigmoid(g[i]);
                            du[i] = da[i] * g[i] * s;
                            dg[i] = da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                        }
                    });
                (dg, du)
            })
        })
    })???;
    let dg = Tensor::from_vec(dg, g.shape(), g.device()).ok()?;
    let du = Tensor::from_vec(du, g.shape(), g.device()).ok()?;
    Some((dg, du))
}

/// Backward of RMSNorm over the last dim (see [`super::ops::rms_norm_backward`]).
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
        let loss: f64 = grad
            .par_chunks_mut(c * v)
            .zip(l.par_chunks(c * v))
            .enumerate()
            .map(|(ci, (g, l))| {
                let mut loss = 0f64;
                for (ri, (g, l)) in g.chunks_mut(v).zip(l.chunks(v)).enumerate() {
                    let row = ci * c + ri;
                    let w = weights[row];
                    if w == 0.0 {
                        continue;
                    }
                    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    for (g, &x) in g.iter_mut().zip(l) {
                        *g = exp(x - m);
                    }
                    let sum = lane_sum(g);
                    let t = targets[row] as usize;
                    let nll = (sum.ln() + m) - l[t];
                    loss += f64::from(w) * f64::from(nll);
                    let scale = w / sum;
                    for g in g.iter_mut() {
                        *g *= scale;
                    }
                    g[t] -= w;
                }
                loss
            })
            .sum();
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
                    let mut max = f32::NEG_INFINITY;
                    for (&x, &mk) in s.iter().zip(m) {
                        if mk == 0.0 {
                            max = max.max(x * scale);
                        }
                    }
                    if max == f32::NEG_INFINITY {
                        let fill = if zero_empty_rows { 0.0 } else { 1.0 / t as f32 };
                        p.iter_mut().for_each(|v| *v = fill);
                        continue;
                    }
                    for ((p, &x), &mk) in p.iter_mut().zip(s).zip(m) {
                        let e = exp(x * scale - max);
                        *p = if mk == 0.0 { e } else { 0.0 };
                    }
                    let sum = lane_sum(p);
                    let inv = 1.0 / sum;
                    p.iter_mut().for_each(|v| *v *= inv);
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

/// `Σ clamp(g·(a − b), ±1e10)²` accumulated in f64 (`None` when the fast path does not
/// apply).
pub fn grad_diff_score(g: &Tensor, a: &Tensor, b: &Tensor) -> Option<f64> {
    if g.dims() != a.dims() || g.dims() != b.dims() {
        return None;
    }
    with_f32(g, |g| {
        with_f32(a, |a| {
            with_f32(b, |b| {
                let c = MIN_ELEMS_PER_TASK;
                g.par_chunks(c)
                    .zip(a.par_chunks(c).zip(b.par_chunks(c)))
                    .map(|(g, (a, b))| {
                        let mut s = 0f64;
                        for i in 0..g.len() {
                            let x = (g[i] * (a[i] - b[i])).clamp(-1e10, 1e10);
                            s += f64::from(x * x);
                        }
                        s
                    })
                    .sum::<f64>()
            })
        })
    })
    .flatten()
    .flatten()
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

    #[test]
    fn lane_sum_adds_every_value() {
        for n in [0usize, 1, 15, 16, 17, 100] {
            let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(lane_sum(&v), (n * n.saturating_sub(1) / 2) as f32, "{n}");
        }
    }
}
