//! Fake quantization (quantize → dequantize, f32 in and out) matching ModelOpt 0.47's
//! `tensor_quant` numerics, on `&[f32]` row-major `[rows, cols]` data or candle tensors.
//! Rows are processed in parallel (rayon).
//!
//! | scheme | ModelOpt path it follows |
//! |---|---|
//! | INT (`Scaled`, `Int(b)`) | `_tensor_quant` (CPU): `scale = maxbound / amax` (f32), `clamp(round_half_even(x·scale), minbound, maxbound) / scale`; `maxbound = 2^(b-1)-1`, `minbound = -maxbound-1` (ModelOpt's default `narrow_range = False`; `-maxbound` when narrow); amax ≤ 2^-24 → output 0 |
//! | FP8 (`Scaled`, E4M3) | `_fp8_eager`: amax ≤ 2^-24 → 1; `scale = 448 · (1/amax)` (how torch evaluates `448.0 / amax`); `e4m3(clamp(x·scale, ±448)) · (1/scale)` |
//! | NVFP4 (`Nvfp4`) | the Triton kernel (`fp4_fake_quant_block`, GPUs ≥ sm89): global scale `g = amax_global · (1/2688)` (torch's CUDA division by a Python float; 1e-12 if 0); block scale `s = e4m3(min(block_amax / (6·g), 448)) · g`, `s < 1e-5 → 1`; `e2m1(|x| / s) · s`, sign of x. qpipe uses the configured block size (the Hopper kernel always uses 16). |
//! | MX (`Mx`) | the CUDA kernel (`fused_amax_convert`, E8M0 scales): `e = ceil(log2(block_amax / elem_max))` ("NV" rule), `elem(|x| · 2^-e) · 2^e`, sign of x; block amax 0/inf/NaN → scale 1 |

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use crate::numerics::{e8m0_exponent_nv, pow2, rne_small, round_e2m1_magnitude, round_e4m3, AMAX_EPSILON, E4M3_MAX};
use crate::observer::{Amax, AmaxKind};
use crate::types::{IntCodes, NumBits, Quantizer, Scheme};
use qpipe_compute::simd_dispatch;

impl Quantizer {
    /// Static ranges of a weight `[out, in]` = max calibration over the weight itself
    /// (what ModelOpt's `max_calibrate` does for weight quantizers).
    pub fn calibrate_weight(&self, w: &[f32], out_features: usize, in_features: usize) -> Result<Option<Amax>> {
        let Some(mut obs) = self.observer() else { return Ok(None) };
        obs.observe(w, out_features, in_features).context("weight")?;
        Ok(obs.amax())
    }

    /// Fake-quantizes a weight `[out, in]`, calibrating its static ranges from itself.
    pub fn fake_quant_weight(&self, w: &[f32], out_features: usize, in_features: usize) -> Result<Vec<f32>> {
        let amax = self.calibrate_weight(w, out_features, in_features)?;
        self.fake_quant(w, out_features, in_features, amax.as_ref())
    }

    /// `amax` checked as the `kind` ranges of a `[rows, cols]` tensor: present, of that
    /// kind and length.
    pub(crate) fn calibrated<'a>(
        &self,
        amax: Option<&'a Amax>,
        kind: AmaxKind,
        rows: usize,
        cols: usize,
    ) -> Result<&'a Amax> {
        let a = amax.with_context(|| {
            format!(
                "the {:?} quantizer ({:?}) needs calibrated ranges; run max calibration first",
                self.role, self.scheme
            )
        })?;
        ensure!(a.kind == kind, "calibrated ranges are {:?}, the quantizer needs {kind:?}", a.kind);
        ensure!(
            a.values.len() == kind.len(rows, cols),
            "calibrated ranges have {} values, a [{rows}, {cols}] tensor needs {} ({kind:?})",
            a.values.len(),
            kind.len(rows, cols)
        );
        Ok(a)
    }

    /// Fake-quantizes `x` `[rows, cols]` (row-major; blocks and per-column ranges run along
    /// `cols`). `amax` = the calibrated ranges when [`Quantizer::needs_calibration`], else
    /// ignored. Errors on a missing or mis-shaped amax, on NaN/inf in dynamic ranges and on
    /// negative inputs to an unsigned quantizer.
    pub fn fake_quant(&self, x: &[f32], rows: usize, cols: usize, amax: Option<&Amax>) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; x.len()];
        self.fake_quant_into(x, rows, cols, amax, &mut out)?;
        Ok(out)
    }

    /// [`Quantizer::fake_quant`] into a caller-provided buffer of the same length.
    pub fn fake_quant_into(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        amax: Option<&Amax>,
        out: &mut [f32],
    ) -> Result<()> {
        ensure!(x.len() == rows * cols, "tensor of {} elements is not [{rows}, {cols}]", x.len());
        ensure!(out.len() == x.len(), "output buffer has {} elements, input {}", out.len(), x.len());
        if x.is_empty() {
            return Ok(());
        }
        let calibrated = |kind: AmaxKind| self.calibrated(amax, kind, rows, cols);
        let dynamic_ranges = |kind: AmaxKind| -> Result<Vec<f32>> {
            let (v, bad) = kind.reduce(x, rows, cols);
            ensure!(!bad, "tensor [{rows}, {cols}] contains NaN or infinite values");
            Ok(v)
        };
        match &self.scheme {
            Scheme::Off => out.copy_from_slice(x),
            Scheme::Scaled { elem, kind, dynamic } => {
                let owned;
                let ranges: &[f32] = if *dynamic {
                    owned = dynamic_ranges(*kind)?;
                    &owned
                } else {
                    &calibrated(*kind)?.values
                };
                match *elem {
                    NumBits::Int(bits) => {
                        if self.unsigned && x.iter().any(|v| *v < 0.0) {
                            bail!("negative values in an unsigned integer quantizer");
                        }
                        int_qdq(x, cols, *kind, ranges, bits, self.unsigned, self.narrow_range, out)
                    }
                    NumBits::FP8_E4M3 => fp8_qdq(x, cols, *kind, ranges, out),
                    e => bail!("no scaled fake quantization for num_bits {}", e.label()),
                }
            }
            Scheme::Nvfp4 { block, global_dynamic } => {
                let global = if *global_dynamic {
                    dynamic_ranges(AmaxKind::PerTensor)?[0]
                } else {
                    calibrated(AmaxKind::PerTensor)?.values[0]
                };
                nvfp4_qdq(x, cols, *block, global, out)
            }
            Scheme::Mx { elem, block } => mx_qdq(x, cols, *block, *elem, out)?,
        }
        Ok(())
    }

    /// The integers behind [`Quantizer::fake_quant`]`(x, rows, cols, amax)` when the scheme
    /// is a signed integer grid of at most 8 bits with one range per tensor or per row
    /// (INT8 weights per channel or per tensor, INT8 inputs per tensor); `None` for every
    /// other scheme. Errors as `fake_quant` does.
    pub fn int_codes(&self, x: &[f32], rows: usize, cols: usize, amax: Option<&Amax>) -> Result<Option<IntCodes>> {
        let Scheme::Scaled { elem: NumBits::Int(bits), kind, dynamic } = self.scheme else { return Ok(None) };
        if bits > 8 || self.unsigned || !matches!(kind, AmaxKind::PerTensor | AmaxKind::PerRow) {
            return Ok(None);
        }
        ensure!(x.len() == rows * cols, "tensor of {} elements is not [{rows}, {cols}]", x.len());
        let owned;
        let ranges: &[f32] = if dynamic {
            let (v, bad) = kind.reduce(x, rows, cols);
            ensure!(!bad, "tensor [{rows}, {cols}] contains NaN or infinite values");
            owned = v;
            &owned
        } else {
            &self.calibrated(amax, kind, rows, cols)?.values
        };
        let (min_bound, max_bound) = int_bounds(bits, false, self.narrow_range);
        let scales = int_scales(ranges, max_bound);
        let mut codes = vec![0i8; x.len()];
        // A NaN has no code (fake quantization passes it through): an error here.
        let nan = codes.par_chunks_mut(cols.max(1)).zip(x.par_chunks(cols.max(1))).enumerate().any(|(r, (c, xr))| {
            let (s, _) = scales[if kind == AmaxKind::PerRow { r } else { 0 }];
            int_codes_row(c, xr, s, min_bound, max_bound)
        });
        ensure!(!nan, "tensor [{rows}, {cols}] contains NaN");
        Ok(Some(IntCodes { rows, cols, codes, kind, divisors: scales.iter().map(|s| s.1).collect() }))
    }

    /// [`Quantizer::int_codes`] of a weight `[out, in]`, its ranges calibrated from itself
    /// (as [`Quantizer::fake_quant_weight`] does).
    pub fn int_codes_weight(&self, w: &[f32], out_features: usize, in_features: usize) -> Result<Option<IntCodes>> {
        let amax = self.calibrate_weight(w, out_features, in_features)?;
        self.int_codes(w, out_features, in_features, amax.as_ref())
    }
}

/// Calls `f(columns, group)` for each run of columns of row `r` that share one range.
#[inline]
fn for_each_run(kind: AmaxKind, r: usize, cols: usize, mut f: impl FnMut(std::ops::Range<usize>, usize)) {
    match kind {
        AmaxKind::PerTensor => f(0..cols, 0),
        AmaxKind::PerRow => f(0..cols, r),
        AmaxKind::PerCol => (0..cols).for_each(|c| f(c..c + 1, c)),
        AmaxKind::PerBlock(n) => {
            let per_row = cols.div_ceil(n);
            for b in 0..per_row {
                f(b * n..((b + 1) * n).min(cols), r * per_row + b);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn int_qdq(
    x: &[f32],
    cols: usize,
    kind: AmaxKind,
    ranges: &[f32],
    bits: u8,
    unsigned: bool,
    narrow_range: bool,
    out: &mut [f32],
) {
    let (min_bound, max_bound) = int_bounds(bits, unsigned, narrow_range);
    let scales = int_scales(ranges, max_bound);
    out.par_chunks_mut(cols).zip(x.par_chunks(cols)).enumerate().for_each(|(r, (o, xr))| {
        for_each_run(kind, r, cols, |cs, g| {
            let (s, d) = scales[g];
            for (o, &v) in o[cs.clone()].iter_mut().zip(&xr[cs]) {
                *o = int_code(v, s, min_bound, max_bound) / d;
            }
        });
    });
}

/// `(min_bound, max_bound)` of an integer grid (ModelOpt's `_tensor_quant`).
fn int_bounds(bits: u8, unsigned: bool, narrow_range: bool) -> (f32, f32) {
    let max_bound = (2.0f64.powi(i32::from(bits) - 1 + i32::from(unsigned)) - 1.0) as f32;
    let min_bound = if unsigned {
        0.0
    } else if narrow_range {
        -max_bound
    } else {
        -max_bound - 1.0
    };
    (min_bound, max_bound)
}

/// (quantize scale, dequantize divisor) per range, as `_tensor_quant` computes them
/// (`max_bound / amax` is a tensor division there: IEEE); a range ≤ 2^-24 quantizes to 0.
fn int_scales(ranges: &[f32], max_bound: f32) -> Vec<(f32, f32)> {
    ranges
        .iter()
        .map(|&a| {
            if a <= AMAX_EPSILON {
                (0.0, 1.0)
            } else {
                let s = max_bound / a;
                (s, s)
            }
        })
        .collect()
}

/// The integer a value quantizes to (as an f32): `round_half_even(clamp(v·s))`. The bounds
/// are integers, so clamping before rounding gives the same value and keeps the argument of
/// `rne_small` in its exact range.
#[inline]
fn int_code(v: f32, s: f32, min_bound: f32, max_bound: f32) -> f32 {
    rne_small((v * s).clamp(min_bound, max_bound))
}

simd_dispatch! {
    /// [`int_codes_row_impl`], vectorized where the CPU allows.
    fn int_codes_row(c: &mut [i8], x: &[f32], s: f32, min_bound: f32, max_bound: f32) -> bool = int_codes_row_impl;
}

/// The codes of one row (`int_code` of each value, as an `i8`), and whether it had a NaN.
/// The integer comes from the bits of `|y| + 1.5·2^23` — the same round-half-even
/// addition `rne_small` does — so the loop has no float-to-int conversion and vectorizes.
#[inline(always)]
fn int_codes_row_impl(c: &mut [i8], x: &[f32], s: f32, min_bound: f32, max_bound: f32) -> bool {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let mut nan = false;
    for (c, &v) in c.iter_mut().zip(x) {
        nan |= v.is_nan();
        let y = (v * s).clamp(min_bound, max_bound);
        let m = ((y.abs() + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits())) as i32;
        *c = (if y < 0.0 { -m } else { m }) as i8;
    }
    nan
}

fn fp8_qdq(x: &[f32], cols: usize, kind: AmaxKind, ranges: &[f32], out: &mut [f32]) {
    let scales: Vec<(f32, f32)> = ranges
        .iter()
        .map(|&a| {
            let safe = if a <= AMAX_EPSILON { 1.0 } else { a };
            // torch evaluates `448.0 / amax` (Python scalar / tensor) as `reciprocal(amax) * 448`,
            // which can differ from a true division by one ulp; `1 / scale` is a reciprocal.
            let s = (1.0 / safe) * E4M3_MAX;
            (s, 1.0 / s)
        })
        .collect();
    out.par_chunks_mut(cols).zip(x.par_chunks(cols)).enumerate().for_each(|(r, (o, xr))| {
        for_each_run(kind, r, cols, |cs, g| {
            let (s, inv) = scales[g];
            for (o, &v) in o[cs.clone()].iter_mut().zip(&xr[cs]) {
                *o = round_e4m3((v * s).clamp(-E4M3_MAX, E4M3_MAX)) * inv;
            }
        });
    });
}

fn block_amax(b: &[f32]) -> f32 {
    b.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn nvfp4_qdq(x: &[f32], cols: usize, block: usize, global_amax: f32, out: &mut [f32]) {
    // `global_amax / (6.0 * 448.0)` on a CUDA tensor with a Python-float divisor: PyTorch's
    // CUDA `div` multiplies by the divisor's reciprocal in that case.
    let g = global_amax * (1.0f32 / 2688.0f32);
    let g = if g > 0.0 { g } else { 1e-12f32 };
    let six_g = 6.0f32 * g;
    out.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, xr)| {
        for (ob, xb) in o.chunks_mut(block).zip(xr.chunks(block)) {
            let s = (block_amax(xb) / six_g).min(E4M3_MAX);
            let mut sq = round_e4m3(s) * g;
            // Triton keeps `sq` only when `sq >= 1e-5` (NaN included in the replacement).
            if sq.is_nan() || sq < 1e-5f32 {
                sq = 1.0;
            }
            for (o, &v) in ob.iter_mut().zip(xb) {
                let q = round_e2m1_magnitude(v.abs() / sq) * sq;
                *o = if v >= 0.0 { q } else { -q };
            }
        }
    });
}

fn mx_qdq(x: &[f32], cols: usize, block: usize, elem: NumBits, out: &mut [f32]) -> Result<()> {
    let elem_max = elem.element_max().with_context(|| format!("no MX element format {}", elem.label()))?;
    let round: fn(f32) -> f32 = if elem == NumBits::FP4_E2M1 { round_e2m1_magnitude } else { round_e4m3 };
    out.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, xr)| {
        for (ob, xb) in o.chunks_mut(block).zip(xr.chunks(block)) {
            let a = block_amax(xb);
            let (scale, unscale) = if a == 0.0 || !a.is_finite() {
                (1.0, 1.0)
            } else {
                let e = e8m0_exponent_nv(a, elem_max);
                (pow2(-e), pow2(e))
            };
            for (o, &v) in ob.iter_mut().zip(xb) {
                let q = round(v.abs() * scale) * unscale;
                *o = if v < 0.0 { -q } else { q };
            }
        }
    });
    Ok(())
}
