//! Which x86-64 vector level the CPU kernels run at, and [`simd_dispatch!`] for
//! element-wise kernels compiled once per level.
//!
//! Every kernel of the scorer gives the same bits at every level: each output value is
//! computed by the same sequence of IEEE operations (the same fused multiply-adds in the
//! same order, the same fixed number of partial sums combined the same way), whatever the
//! register width; only how many values are in flight changes. `QPIPE_SIMD` forces a
//! level at or below what the CPU has, so that one machine can run (and the tests can
//! compare) every code path:
//!
//! | `QPIPE_SIMD` | what runs |
//! |--------------|-----------|
//! | `scalar`     | the baseline x86-64 build (SSE2), FMAs emulated exactly ([`fma_f32`]) |
//! | `avx2`       | AVX2 + FMA kernels (x86-64-v3) |
//! | `avx512`     | AVX-512F kernels; integer products without VNNI |
//! | `vnni`       | AVX-512F kernels and VNNI integer products (the default where available) |

use std::sync::OnceLock;

/// The environment variable that caps the level.
pub const ENV: &str = "QPIPE_SIMD";

/// A vector level, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// No vector extension beyond the x86-64 baseline (or not x86-64 at all).
    Scalar,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512F (and BW), without the VNNI integer dot products.
    Avx512,
    /// AVX-512F, BW and VNNI.
    Avx512Vnni,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 4] = [Level::Scalar, Level::Avx2, Level::Avx512, Level::Avx512Vnni];

    /// The name `QPIPE_SIMD` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Vnni => "vnni",
        }
    }

    /// The level a `QPIPE_SIMD` value names.
    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name().eq_ignore_ascii_case(s.trim()))
    }
}

impl Level {
    /// Every level this CPU supports, lowest first (what the same-bits tests compare).
    pub fn supported() -> Vec<Level> {
        Level::ALL.into_iter().filter(|l| *l <= detected()).collect()
    }
}

/// The highest level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("fma") {
            return if has!("avx512vnni") { Level::Avx512Vnni } else { Level::Avx512 };
        }
        if has!("avx2") && has!("fma") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level the kernels run at: the CPU's, lowered by `QPIPE_SIMD` (decided once per
/// process; a value above the CPU's level or not a level is reported once, on stderr).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cpu = detected();
        let Ok(v) = std::env::var(ENV) else { return cpu };
        match Level::parse(&v) {
            Some(l) if l <= cpu => l,
            Some(l) => {
                eprintln!(
                    "warning: {ENV}={v}: this CPU only supports `{}`; using that instead of `{}`",
                    cpu.name(),
                    l.name()
                );
                cpu
            }
            None => {
                let names: Vec<&str> = Level::ALL.iter().map(|l| l.name()).collect();
                eprintln!("warning: {ENV}={v} is not one of {}; using `{}`", names.join(", "), cpu.name());
                cpu
            }
        }
    })
}

/// `a·b + c` rounded once to f32 — the result of an FMA instruction and of `f32::mul_add` —
/// in baseline x86-64 arithmetic, with no libm call (which costs ~30× the scalar GEMM's
/// time): the product is exact in f64 (24 + 24 bits), the sum is rounded to odd (its exact
/// error from Knuth's TwoSum decides the last bit), and a value rounded to odd with at
/// least 2 more bits than f32 rounds to the nearest f32 as the exact sum would (Boldo &
/// Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using
/// rounding to odd", IEEE TC 2008). Tested against `f32::mul_add` bit for bit.
#[inline(always)]
pub fn fma_f32(a: f32, b: f32, c: f32) -> f32 {
    let p = f64::from(a) * f64::from(b);
    let c = f64::from(c);
    let s = p + c;
    let bb = s - p;
    let e = (p - (s - bb)) + (c - bb);
    // When inexact and even, step to the neighbour of `s` on the side of the exact sum
    // `s + e` (away from zero when `e` has the sign of `s`). Branch-free, so that the
    // GEMM's scalar loop vectorizes.
    let bits = s.to_bits();
    let step = u64::from(e != 0.0) & u64::from(s.is_finite()) & !bits & 1;
    let away = (e > 0.0) == (s > 0.0);
    let bits = if away { bits.wrapping_add(step) } else { bits.wrapping_sub(step) };
    f64::from_bits(bits) as f32
}

/// `fn name(args) = imp;` defines `name`, which runs `imp` (an `#[inline(always)]` kernel)
/// compiled for AVX-512F when [`level`] allows it, for AVX2 + FMA below that, and as built
/// (the x86-64 baseline) otherwise: 16, 8 or 4 lanes, masked selects or branches — the
/// same IEEE operations in the same order at each level (Rust never re-associates or
/// contracts floating-point arithmetic), so the same bits.
#[macro_export]
macro_rules! simd_dispatch {
    ($(#[doc = $d:literal])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $imp:ident;) => {
        $(#[doc = $d])*
        fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    $imp($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    $imp($($a),*)
                }
                let level = $crate::simd::level();
                if level >= $crate::simd::Level::Avx512 {
                    // SAFETY: the CPU has AVX-512F (`level` never exceeds `detected`).
                    return unsafe { avx512($($a),*) };
                }
                if level >= $crate::simd::Level::Avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (as above).
                    return unsafe { avx2($($a),*) };
                }
            }
            $imp($($a),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit for bit against the hardware (or libm) FMA on random operands of every scale,
    /// cancellations, halfway cases, overflow, subnormals, infinities and NaN.
    #[test]
    fn emulated_fma_is_the_fused_multiply_add() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let special = [0.0, -0.0, 1.0, -1.0, f32::MAX, f32::MIN_POSITIVE, 1e-45, f32::INFINITY, f32::NAN, 0.5, 3.0];
        for i in 0..3_000_000u64 {
            let r = next();
            let pick = |k: u64| -> f32 {
                match (r >> (k * 4)) & 0xF {
                    0 => special[((r >> 40) % special.len() as u64) as usize],
                    // near 1 with random low bits: products whose halves land on ties
                    1..=5 => f32::from_bits(0x3F80_0000 | ((r >> (k * 8)) as u32 & 0x7FFF)),
                    _ => f32::from_bits((r >> (k * 21)) as u32),
                }
            };
            let (a, b) = (pick(0), pick(1));
            // c: random, or minus the rounded product (catastrophic cancellation)
            let c = if i % 3 == 0 { -(a * b) } else { pick(2) };
            let (want, got) = (a.mul_add(b, c), fma_f32(a, b, c));
            assert!(
                want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()),
                "fma({a:e}, {b:e}, {c:e}) = {want:e}, emulated {got:e}"
            );
        }
    }

    #[test]
    fn levels_parse_by_name_and_order_by_width() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        assert_eq!(Level::parse(" AVX2 "), Some(Level::Avx2));
        assert_eq!(Level::parse("sse4"), None);
        assert!(Level::Scalar < Level::Avx2 && Level::Avx2 < Level::Avx512 && Level::Avx512 < Level::Avx512Vnni);
        assert!(level() <= detected());
        assert_eq!(Level::supported().first(), Some(&Level::Scalar));
        assert_eq!(Level::supported().last(), Some(&detected()));
    }
}
