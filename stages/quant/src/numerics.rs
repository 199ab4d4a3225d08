//! Element formats: rounding an `f32` to FP8 E4M3, FP4 E2M1 and integer grids, and the
//! E8M0 shared exponent of the OCP MX formats — each exactly as ModelOpt 0.47 rounds.
//!
//! | function            | ModelOpt counterpart                                              |
//! |---------------------|-------------------------------------------------------------------|
//! | [`round_e4m3`]      | `x.to(torch.float8_e4m3fn)` (RNE) after ModelOpt clamps to ±448; Triton `cvt.rn.satfinite` |
//! | [`round_e2m1`]      | `fp4_round_magnitude` (Triton) / `round_to_even` table (CUDA)     |
//! | [`e8m0_exponent_nv`]| `compute_scale_e8m0_NV` in `tensor_quant_mx.cu`                   |

/// Largest finite FP8 E4M3 (`fn` variant) magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Largest FP4 E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// ModelOpt's "zero amax" threshold: an amax `<= 2^-24` (the smallest fp16 subnormal)
/// is treated as zero (`tensor_quant._tensor_quant`, `_fp8_eager`).
pub const AMAX_EPSILON: f32 = 1.0 / (1u32 << 24) as f32;

/// `2^k` as an exact `f32` (k in [-149, 127]).
#[inline]
pub fn pow2(k: i32) -> f32 {
    debug_assert!((-149..=127).contains(&k), "2^{k} is not a finite, non-zero f32");
    if k >= -126 {
        f32::from_bits(((k + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (k + 149))
    }
}

/// floor(log2 |a|) of a finite, non-zero normal f32 (exact, from the exponent bits).
#[inline]
fn exponent_of(a: f32) -> i32 {
    ((a.to_bits() >> 23) & 0xff) as i32 - 127
}

/// Round to the nearest integer, ties to even, for `|x| ≤ 2^22` (larger values come back
/// unchanged only if already integral — callers clamp first). Adding and subtracting
/// 1.5·2^23 leaves the rounding to the FPU's round-to-nearest-even, and the sign of `x`
/// (zero included) is kept: the same result as `round_ties_even`, but two adds instead of
/// a libm call (`rintf` without SSE4.1), so loops over it vectorize.
#[inline]
pub fn rne_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    ((x.abs() + MAGIC) - MAGIC).copysign(x)
}

/// Round to the nearest FP8 E4M3 value, ties to even, saturating at ±448 (what a
/// `satfinite` conversion does; ModelOpt's torch path clamps to ±448 before casting, so
/// both agree). Subnormals (quantum 2^-9 below 2^-6) are kept; NaN stays NaN; the sign of
/// zero is kept.
#[inline]
pub fn round_e4m3(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return E4M3_MAX.copysign(x);
    }
    // Binade of `a`; everything below 2^-6 shares the subnormal quantum 2^-9.
    let e = if a < pow2(-6) { -6 } else { exponent_of(a) };
    // Quantum 2^(e-3): scaling by a power of two is exact, so the only rounding is here.
    let q = rne_small(a * pow2(3 - e)) * pow2(e - 3);
    q.min(E4M3_MAX).copysign(x)
}

/// Round a magnitude to the nearest FP4 E2M1 value {0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to
/// even (0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4), saturating at 6. NaN and
/// ±inf saturate to 6 like ModelOpt's kernels. Takes and returns magnitudes (`|x|`).
#[inline]
pub fn round_e2m1_magnitude(a: f32) -> f32 {
    if a <= 0.25 {
        0.0
    } else if a < 0.75 {
        0.5
    } else if a <= 1.25 {
        1.0
    } else if a < 1.75 {
        1.5
    } else if a <= 2.5 {
        2.0
    } else if a < 3.5 {
        3.0
    } else if a <= 5.0 {
        4.0
    } else {
        6.0
    }
}

/// Signed E2M1 rounding: the magnitude rounded by [`round_e2m1_magnitude`], sign of `x`
/// (so -0.1 → -0.0).
pub fn round_e2m1(x: f32) -> f32 {
    round_e2m1_magnitude(x.abs()).copysign(x)
}

/// The power-of-two exponent `e` of an MX block's shared E8M0 scale, as ModelOpt's CUDA
/// kernel computes it ("NV" algorithm, `compute_scale_e8m0_NV`): `e = ceil(log2(amax /
/// elem_max))` evaluated on the bits of the f32 quotient (so an exact power of two is not
/// rounded up), limited to [-127, 127] by the E8M0 range. The block is scaled by `2^-e`
/// before element rounding and by `2^e` after. `amax` must be positive and finite.
///
/// (The OCP MX spec's own rule is `floor(log2(amax)) - floor(log2(elem_max_pow2))`;
/// ModelOpt uses the NV rule, which never clips the block maximum. qpipe follows ModelOpt.)
pub fn e8m0_exponent_nv(amax: f32, elem_max: f32) -> i32 {
    let ratio = amax / elem_max;
    let bits = ratio.to_bits();
    let exp_field = ((bits >> 23) & 0xff) as i32;
    let sig = bits & 0x7f_ffff;
    let round_up = sig > 0 && exp_field != 0xfe && !(exp_field == 0 && sig <= 0x40_0000);
    if round_up {
        exp_field - 126
    } else {
        exp_field - 127
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_is_exact_over_the_f32_range() {
        for k in -149..=127 {
            assert_eq!(f64::from(pow2(k)), 2f64.powi(k), "2^{k}");
        }
    }

    #[test]
    fn e4m3_grid_points_are_fixed_points() {
        // Every finite E4M3 value, built from its bit fields, must round to itself.
        for bits in 0u8..0x7f {
            let e = (bits >> 3) as i32;
            let m = (bits & 7) as f32;
            let v = if e == 0 { m * pow2(-9) } else { (1.0 + m / 8.0) * pow2(e - 7) };
            if v > 448.0 {
                continue;
            }
            assert_eq!(round_e4m3(v), v, "bits {bits:#04x}");
            assert_eq!(round_e4m3(-v), -v, "bits -{bits:#04x}");
        }
    }

    #[test]
    fn e4m3_ties_saturation_and_subnormals() {
        // Between 1.0 and 1.125 (quantum 1/8): the midpoint ties to the even mantissa (1.0).
        assert_eq!(round_e4m3(1.0625), 1.0);
        for x in [0.5f32, 1.5, 2.5, -0.5, -2.5, 0.49999997, 3.7, -3.2, 0.0, -0.0, 4194303.5, -4194302.5, 127.5, -128.5]
        {
            assert_eq!(rne_small(x).to_bits(), x.round_ties_even().to_bits(), "{x}");
        }
        // Between 1.125 and 1.25: the midpoint 1.1875 ties to 1.25 (mantissa 010, even).
        assert_eq!(round_e4m3(1.1875), 1.25);
        assert_eq!(round_e4m3(1.19), 1.25);
        assert_eq!(round_e4m3(1.18), 1.125);
        // Top binade (quantum 32): 432 is a tie between 416 and 448 → 448 (even).
        assert_eq!(round_e4m3(432.0), 448.0);
        assert_eq!(round_e4m3(420.0), 416.0);
        // Saturation instead of overflow.
        assert_eq!(round_e4m3(464.0), 448.0);
        assert_eq!(round_e4m3(1.0e9), 448.0);
        assert_eq!(round_e4m3(-1.0e9), -448.0);
        assert_eq!(round_e4m3(f32::INFINITY), 448.0);
        // Subnormals: quantum 2^-9 = 0.001953125.
        let q = pow2(-9);
        assert_eq!(round_e4m3(q), q);
        assert_eq!(round_e4m3(0.5 * q), 0.0); // tie → 0 (even)
        assert_eq!(round_e4m3(0.51 * q), q);
        assert_eq!(round_e4m3(1.5 * q), 2.0 * q); // tie → 2q (even)
        assert_eq!(round_e4m3(2.5 * q), 2.0 * q); // tie → 2q (even)
        assert_eq!(round_e4m3(7.5 * q), 8.0 * q); // tie → 8q = 2^-6, the smallest normal
                                                  // Signed zeros and NaN.
        assert!(round_e4m3(-0.0).is_sign_negative());
        assert!(round_e4m3(-0.1 * q).is_sign_negative());
        assert_eq!(round_e4m3(-0.1 * q), 0.0);
        assert!(round_e4m3(f32::NAN).is_nan());
    }

    #[test]
    fn e2m1_rounding_table() {
        let cases = [
            (0.0, 0.0),
            (0.25, 0.0),
            (0.2500001, 0.5),
            (0.5, 0.5),
            (0.75, 1.0),
            (0.7499999, 0.5),
            (1.25, 1.0),
            (1.2500001, 1.5),
            (1.75, 2.0),
            (2.5, 2.0),
            (2.5000002, 3.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.0000005, 6.0),
            (6.0, 6.0),
            (100.0, 6.0),
            (f32::INFINITY, 6.0),
        ];
        for (x, want) in cases {
            assert_eq!(round_e2m1(x), want, "x = {x}");
            assert_eq!(round_e2m1(-x), -want, "x = -{x}");
        }
        assert!(round_e2m1(-0.1).is_sign_negative());
        assert_eq!(round_e2m1_magnitude(f32::NAN), 6.0);
    }

    #[test]
    fn e8m0_exponent_is_ceil_log2_of_amax_over_max() {
        assert_eq!(e8m0_exponent_nv(6.0, 6.0), 0); // ratio exactly 1
        assert_eq!(e8m0_exponent_nv(6.000001, 6.0), 1);
        assert_eq!(e8m0_exponent_nv(5.9, 6.0), 0);
        assert_eq!(e8m0_exponent_nv(3.0, 6.0), -1); // ratio 0.5 exactly
        assert_eq!(e8m0_exponent_nv(3.1, 6.0), 0);
        assert_eq!(e8m0_exponent_nv(12.0, 6.0), 1);
        assert_eq!(e8m0_exponent_nv(1.0, 6.0), -2); // 1/6 → ceil(log2 0.1667) = -2
        assert_eq!(e8m0_exponent_nv(f32::MAX, 6.0), 126); // ceil(log2(5.67e37))
        assert_eq!(e8m0_exponent_nv(f32::MAX, 1.0), 127); // clipped by the format
                                                          // Tiny amax: the quotient is subnormal; the kernel floors it at -127 / -126.
        assert_eq!(e8m0_exponent_nv(pow2(-149), 6.0), -127);
        assert_eq!(e8m0_exponent_nv(pow2(-126), 1.0), -126);
        // After scaling by 2^-e the block max never exceeds the element max.
        for &a in &[0.1f32, 0.7, 1.0, 5.99, 6.0, 6.01, 100.0, 1.0e-20, 3.3e30] {
            let e = e8m0_exponent_nv(a, 6.0);
            assert!(a * pow2(-e) <= 6.0, "amax {a} e {e}");
            assert!(a * pow2(-e) > 3.0 || e == -127, "amax {a} e {e} wastes a binade");
        }
    }
}
