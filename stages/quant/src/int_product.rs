//! `q(X)·q(W)ᵀ` computed on the integer codes when both operands are on 8-bit integer
//! grids (INT8_DEFAULT: inputs per tensor, weights per output channel).
//!
//! With `x_q = c_x / d_x` and `w_q[j] = c_w[j] / d_w[j]` ([`IntCodes`]), the product is
//! `y[i][j] = (Σ_k c_x[i][k]·c_w[j][k]) / (d_x·d_w[j])`. The integer sum is exact (i32),
//! so the only roundings are the final conversion and scaling — where the f32 product
//! ModelOpt computes rounds at every one of the `k` additions. The two agree to f32
//! rounding (`tests` bound it).
//!
//! Exact sums make the result independent of how they are computed, so every vector level
//! ([`qpipe_compute::simd::level`]) gives the same bits: with AVX-512 VNNI, `vpdpbusd`
//! (64 multiply-adds per instruction) on a weight packed once per linear into panels of 32
//! output channels holding 4 consecutive `k` per 32-bit lane, each kernel call keeping a
//! 12 × 32 tile of i32 sums in 24 registers over all of `k`; below VNNI, i32 dot products
//! of weight rows that the compiler vectorizes for the level. `vpdpbusd` multiplies
//! unsigned by signed bytes, so the input codes are stored as `c_x + 128` and
//! `128·Σ_k c_w[j][k]` is taken off each sum (both paths). The fused score
//! ([`product_score`]) combines its terms in one fixed order — 8 f64 lanes per tile, a fixed
//! tree across them, tiles in order — at every level and thread count.

use qpipe_compute::par::SendPtr;
use rayon::prelude::*;

use qpipe_compute::simd::{self, Level};

use crate::observer::AmaxKind;
use crate::types::IntCodes;

const MR: usize = 12;
const NR: usize = 32;
/// `k` beyond which the i32 sums could overflow (255 · 127 · k < 2³¹).
const MAX_K: usize = 60_000;

/// `k` rounded up to whole groups of 4.
fn k4(k: usize) -> usize {
    k.div_ceil(4) * 4
}

/// A weight's codes `[n, k]` laid out for the level's kernel, with its per-channel divisors.
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// The level whose kernel reads `codes`.
    level: Level,
    /// VNNI: `ceil(n / 32)` panels of `[k4 / 4][32 channels][4 bytes]`; below: `n` rows of
    /// `k4` bytes. Zero past `n` and `k`.
    codes: Vec<i8>,
    /// `128 · Σ_k c_w[j][k]` per channel: what the `+128` of the input codes adds.
    offset: Vec<i32>,
    divisors: Vec<f32>,
}

impl PackedWeight {
    /// Packs weight codes (per tensor or per row) for the kernels of this run's level;
    /// `None` when `k` is too large for exact i32 sums.
    pub fn new(w: &IntCodes) -> Option<Self> {
        Self::new_at(w, simd::level())
    }

    /// [`PackedWeight::new`] for the kernels of `level` (at most [`simd::detected`]).
    pub fn new_at(w: &IntCodes, level: Level) -> Option<Self> {
        if w.cols > MAX_K || w.codes.len() != w.rows * w.cols || level > simd::detected() {
            return None;
        }
        let (n, k) = (w.rows, w.cols);
        let kp = k4(k);
        let codes = if level == Level::Avx512Vnni {
            let mut panels = vec![0i8; n.div_ceil(NR) * kp * NR];
            panels.par_chunks_mut((kp * NR).max(1)).enumerate().for_each(|(p, panel)| {
                for c in 0..NR.min(n - p * NR) {
                    let row = &w.codes[(p * NR + c) * k..(p * NR + c + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[(kk / 4) * NR * 4 + c * 4 + kk % 4] = v;
                    }
                }
            });
            panels
        } else {
            let mut rows = vec![0i8; n * kp];
            if k > 0 {
                rows.par_chunks_mut(kp).zip(w.codes.par_chunks(k)).for_each(|(d, s)| d[..k].copy_from_slice(s));
            }
            rows
        };
        let offset = w.codes.chunks(k.max(1)).map(|r| 128 * r.iter().map(|&v| i32::from(v)).sum::<i32>()).collect();
        let divisors = match w.kind {
            AmaxKind::PerRow => w.divisors.clone(),
            _ => vec![w.divisors[0]; n],
        };
        // The AVX2 sign trick cannot negate the code −128: such a weight takes the scalar
        // loop (the same integers, so the same outputs).
        let level = if level < Level::Avx512Vnni && w.codes.contains(&i8::MIN) { Level::Scalar } else { level };
        Some(Self { n, k, level, codes, offset, divisors })
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// An input's codes `[m, k]` with one divisor, stored as `c + 128` in rows of `k4` bytes
/// (padding 128, the code 0).
pub struct InputCodes {
    m: usize,
    k: usize,
    data: Vec<u8>,
    divisor: f32,
}

impl InputCodes {
    /// `None` unless the codes have one divisor for the whole tensor.
    pub fn new(x: &IntCodes) -> Option<Self> {
        if x.kind != AmaxKind::PerTensor || x.codes.len() != x.rows * x.cols {
            return None;
        }
        let (m, k) = (x.rows, x.cols);
        let kp = k4(k);
        let mut data = vec![128u8; m * kp];
        // `c + 128` is the two's-complement byte with its top bit flipped.
        let offset = |d: &mut [u8], c: &[i8]| d.iter_mut().zip(c).for_each(|(d, &c)| *d = (c as u8) ^ 0x80);
        if kp == k {
            data.par_chunks_mut(1 << 16).zip(x.codes.par_chunks(1 << 16)).for_each(|(d, c)| offset(d, c));
        } else {
            data.par_chunks_mut(kp.max(1)).zip(x.codes.par_chunks(k.max(1))).for_each(|(d, c)| offset(d, c));
        }
        Some(Self { m, k, data, divisor: x.divisors[0] })
    }

    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }
}

/// Checks shapes and row indices; the rows to use (`rows`, or all of them).
fn picked_rows(x: &InputCodes, rows: Option<&[u32]>, w: &PackedWeight) -> Option<Vec<usize>> {
    if x.k != w.k || rows.is_some_and(|r| r.iter().any(|&i| i as usize >= x.m)) {
        return None;
    }
    Some(match rows {
        Some(r) => r.iter().map(|&i| i as usize).collect(),
        None => (0..x.m).collect(),
    })
}

/// Per channel: `1 / (d_x · d_w[j])`, the scale of the exact integer sums.
fn scales(x: &InputCodes, w: &PackedWeight) -> Vec<f32> {
    w.divisors.iter().map(|&d| (1.0 / (f64::from(x.divisor) * f64::from(d))) as f32).collect()
}

/// One `MR × NR` tile of a product: the input rows (`a`, `rows` of them used), the weight
/// codes of its `cols ≤ NR` channels (a VNNI panel, or `cols` rows of `kp` bytes) with their
/// offsets and scales, and where it sits in the output (first picked row `r0`, first
/// channel `c0`).
struct Tile<'a> {
    a: [*const u8; MR],
    rows: usize,
    kp: usize,
    weights: &'a [i8],
    offset: &'a [i32],
    scale: &'a [f32],
    r0: usize,
    c0: usize,
}

/// Runs `tile` on every `MR`-row tile of the picked rows and every panel of `w` (`scale`:
/// [`scales`]), tiles split over the threads; returns the results in tile order (row tiles,
/// and within one the panels), whatever the thread count.
fn for_each_tile<R: Send>(
    x: &InputCodes,
    picked: &[usize],
    w: &PackedWeight,
    scale: &[f32],
    tile: impl Fn(&Tile) -> R + Sync,
) -> Vec<R> {
    let (m, kp) = (picked.len(), k4(x.k));
    // A row of codes 0 for the unused rows of a last, partial tile.
    let zero_row = vec![128u8; kp];
    let tiles = m.div_ceil(MR);
    let per_task = tiles.div_ceil(4 * rayon::current_num_threads()).max(1);
    let vnni = w.level == Level::Avx512Vnni;
    let per_task: Vec<Vec<R>> = (0..tiles.div_ceil(per_task))
        .into_par_iter()
        .map(|task| {
            let mut out = Vec::new();
            for t in task * per_task..((task + 1) * per_task).min(tiles) {
                let r0 = t * MR;
                let mr = MR.min(m - r0);
                let mut a = [zero_row.as_ptr(); MR];
                for (r, a) in a.iter_mut().enumerate().take(mr) {
                    *a = x.data[picked[r0 + r] * kp..].as_ptr();
                }
                for p in 0..w.n.div_ceil(NR) {
                    let (c0, cols) = (p * NR, NR.min(w.n - p * NR));
                    let weights = if vnni {
                        &w.codes[p * kp * NR..(p + 1) * kp * NR]
                    } else {
                        &w.codes[c0 * kp..(c0 + cols) * kp]
                    };
                    let t = Tile {
                        a,
                        rows: mr,
                        kp,
                        weights,
                        offset: &w.offset[c0..c0 + cols],
                        scale: &scale[c0..c0 + cols],
                        r0,
                        c0,
                    };
                    out.push(tile(&t));
                }
            }
            out
        })
        .collect();
    per_task.into_iter().flatten().collect()
}

/// `x_q · w_qᵀ` as a row-major `[rows, n]` f32 vector, over the rows `rows` of `x` (all of
/// them when `None`); `None` when the shapes disagree or a row index is out of range.
pub fn product(x: &InputCodes, rows: Option<&[u32]>, w: &PackedWeight) -> Option<Vec<f32>> {
    let picked = picked_rows(x, rows, w)?;
    let (m, n) = (picked.len(), w.n);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let op = SendPtr(out.as_mut_ptr());
    let op = &op;
    for_each_tile(x, &picked, w, &scales(x, w), |t| {
        let c = op.0.wrapping_add(t.r0 * n + t.c0);
        #[cfg(target_arch = "x86_64")]
        if w.level == Level::Avx512Vnni {
            // SAFETY: the CPU has VNNI (`PackedWeight::new_at`); each of the MR row pointers
            // has `kp` readable bytes, the panel `kp·NR`; the tile writes its `cols` values
            // of rows `r0 .. r0 + rows` of the `m·n` output, rows that only this tile's task
            // writes, at columns `c0 ..` inside `n`.
            unsafe { kernel_store(t, c, n) };
            return;
        }
        let out = tile_outputs_rows(t, w.level);
        for (r, o) in out.iter().enumerate().take(t.rows) {
            // SAFETY: as above: row `r0 + r`, columns `c0 .. c0 + cols` of the output.
            unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), c.add(r * n), t.offset.len()) };
        }
    });
    // SAFETY: every one of the `m·n` values was written above (all tiles, all panels).
    unsafe { out.set_len(m * n) };
    Some(out)
}

/// The gradient score term `Σ clamp(g ⊙ (x_q·w_qᵀ − y), ±1e10)²` over the rows `rows` of
/// `x` (all when `None`) — each term in f32, as ModelOpt's, summed in f64 — without
/// forming the product: `g` and `y` are the full `[m, n]` row-major output gradient and
/// unquantized output, read at the picked rows. `None` when shapes disagree. The terms are
/// combined in one order at every level and thread count: per tile as [`score_terms`]
/// does, then the tiles' sums left to right.
pub fn product_score(x: &InputCodes, rows: Option<&[u32]>, w: &PackedWeight, g: &[f32], y: &[f32]) -> Option<f64> {
    let picked = picked_rows(x, rows, w)?;
    let n = w.n;
    if g.len() != x.m * n || y.len() != x.m * n {
        return None;
    }
    let zero = [0f32; NR];
    let parts = for_each_tile(x, &picked, w, &scales(x, w), |t| {
        let (mut gr, mut yr) = ([zero.as_ptr(); MR], [zero.as_ptr(); MR]);
        for r in 0..t.rows {
            let at = picked[t.r0 + r] * n + t.c0;
            (gr[r], yr[r]) = (g[at..].as_ptr(), y[at..].as_ptr());
        }
        #[cfg(target_arch = "x86_64")]
        if w.level == Level::Avx512Vnni {
            // SAFETY: as in `product`; besides, `gr`/`yr` point at `cols` readable values
            // (row `picked[..]` of `g`/`y` from column `c0`, inside `n`).
            return unsafe { kernel_score(t, &gr, &yr) };
        }
        let out = tile_outputs_rows(t, w.level);
        // SAFETY: as above.
        unsafe { score_terms(&out, t.rows, t.offset.len(), &gr, &yr) }
    });
    Some(parts.iter().sum())
}

/// The 8 f64 lanes of a tile's score combined in the fixed tree of `_mm512_reduce_add_pd`:
/// `((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))`.
fn reduce8(v: [f64; 8]) -> f64 {
    ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
}

/// The score of one tile from its outputs `out` (`rows` × `cols` used), in the order of the
/// AVX-512 kernel: per row, per 16-column half, the 16 squared terms (0 past `cols`) added
/// pairwise (`l`, `l + 8`) into 8 f64 lanes, then [`reduce8`].
///
/// # Safety
/// `g[r]` and `y[r]` must point at `cols` readable values for every `r < rows`.
unsafe fn score_terms(
    out: &[[f32; NR]; MR],
    rows: usize,
    cols: usize,
    g: &[*const f32; MR],
    y: &[*const f32; MR],
) -> f64 {
    let mut acc = [0f64; 8];
    for r in 0..rows {
        for h in 0..2 {
            let mut sq = [0f32; 16];
            for (l, sq) in sq.iter_mut().enumerate() {
                let c = 16 * h + l;
                if c < cols {
                    let t = *g[r].add(c) * (out[r][c] - *y[r].add(c));
                    // `_mm512_max_ps(lo, t)` then `_mm512_min_ps(hi, ·)`: NaN stays NaN.
                    let t = if -1e10 > t { -1e10 } else { t };
                    let t = if 1e10 < t { 1e10 } else { t };
                    *sq = t * t;
                }
            }
            for l in 0..8 {
                acc[l] += f64::from(sq[l]) + f64::from(sq[l + 8]);
            }
        }
    }
    reduce8(acc)
}

/// The tile's outputs `Σ_k c_x·c_w · scale[c]` below VNNI: exact i32 dot products of its
/// rows with the weight rows (the same integers as the VNNI kernel's `Σ − offset[c]`, so the
/// same f32 outputs).
fn tile_outputs_rows(t: &Tile, level: Level) -> [[f32; NR]; MR] {
    let mut out = [[0f32; NR]; MR];
    let cols = t.offset.len();
    for (r, out) in out.iter_mut().enumerate().take(t.rows) {
        // SAFETY: each used row pointer has `kp` readable bytes (`for_each_tile`).
        let a = unsafe { std::slice::from_raw_parts(t.a[r], t.kp) };
        let mut sums = [0i32; NR];
        dot_rows(level, a, &t.weights[..cols * t.kp], &mut sums[..cols]);
        for c in 0..cols {
            out[c] = sums[c] as f32 * t.scale[c];
        }
    }
    out
}

/// `sums[c] = Σ_k (a[k] − 128)·w[c][k]` (exact: the codes' product) for the rows `w[c]` of
/// `a.len()` bytes. AVX2 (also below VNNI on AVX-512 CPUs): 32 products per step with the
/// sign trick — `maddubs(|x|, sign(w, x))` — whose pair sums cannot saturate because
/// `|x| ≤ 128` and `|w| ≤ 127` (weights holding the code −128 get the scalar loop, see
/// [`PackedWeight::new_at`]). Scalar: a plain loop.
fn dot_rows(level: Level, a: &[u8], w: &[i8], sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 {
        // SAFETY: the CPU has AVX2 (`level` ≤ `detected`, checked in `new_at`); `w` holds
        // `sums.len()` rows of `a.len()` bytes.
        return unsafe { dot_rows_avx2(a, w, sums) };
    }
    let _ = level;
    dot_rows_scalar(a, w, sums)
}

fn dot_rows_scalar(a: &[u8], w: &[i8], sums: &mut [i32]) {
    for (s, w) in sums.iter_mut().zip(w.chunks_exact(a.len().max(1))) {
        *s = a.iter().zip(w).map(|(&a, &w)| (i32::from(a) - 128) * i32::from(w)).sum();
    }
}

/// [`dot_rows`] with AVX2: four weight rows per pass over `a`.
///
/// # Safety
/// AVX2 must be available; `w.len() ≥ sums.len() · a.len()`; no weight code is −128.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(a: &[u8], w: &[i8], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let k = a.len();
    debug_assert!(w.len() >= sums.len() * k);
    let k32 = k / 32 * 32;
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    let (ap, wp) = (a.as_ptr(), w.as_ptr());
    let mut c = 0;
    while c < sums.len() {
        let n = (sums.len() - c).min(4);
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut kk = 0;
        while kk < k32 {
            // the codes c_x = a − 128, as signed bytes
            let x = _mm256_xor_si256(_mm256_loadu_si256(ap.add(kk) as *const __m256i), flip);
            let ax = _mm256_abs_epi8(x);
            for (j, acc) in acc.iter_mut().enumerate().take(n) {
                let wv = _mm256_loadu_si256(wp.add((c + j) * k + kk) as *const __m256i);
                let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, x));
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pairs, ones));
            }
            kk += 32;
        }
        for (j, acc) in acc.iter().enumerate().take(n) {
            let mut s = hsum_avx2(*acc);
            for t in k32..k {
                s += (i32::from(*ap.add(t)) - 128) * i32::from(*wp.add((c + j) * k + t));
            }
            sums[c + j] = s;
        }
        c += n;
    }
}

/// The sum of the 8 i32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum_avx2(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// The i32 sums of one `MR × NR` tile: `Σ_q dpbusd(a[r][4q..], panel[q][c])`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_sums(t: &Tile) -> [[std::arch::x86_64::__m512i; 2]; MR] {
    use std::arch::x86_64::*;
    let panel = t.weights.as_ptr();
    let mut acc = [[_mm512_setzero_si512(); 2]; MR];
    for q in 0..t.kp / 4 {
        let b0 = _mm512_loadu_si512(panel.add(q * NR * 4) as *const __m512i);
        let b1 = _mm512_loadu_si512(panel.add(q * NR * 4 + 64) as *const __m512i);
        for (acc, &ar) in acc.iter_mut().zip(&t.a) {
            let av = _mm512_set1_epi32((ar.add(q * 4) as *const i32).read_unaligned());
            acc[0] = _mm512_dpbusd_epi32(acc[0], av, b0);
            acc[1] = _mm512_dpbusd_epi32(acc[1], av, b1);
        }
    }
    acc
}

/// Lane masks for the first `cols` (≤ 32) columns of a tile, 16 per register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn col_masks(cols: usize) -> (u16, u16) {
    let m0 = if cols >= 16 { 0xFFFF } else { ((1u32 << cols) - 1) as u16 };
    let m1 = if cols >= 32 {
        0xFFFF
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as u16
    } else {
        0
    };
    (m0, m1)
}

/// The tile's outputs `(sums − offset[c]) · scale[c]` for its `cols = offset.len()`
/// columns, 16 per register (lanes past `cols` are 0).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_outputs(t: &Tile) -> ([[std::arch::x86_64::__m512; 2]; MR], (u16, u16)) {
    use std::arch::x86_64::*;
    let (offset, scale) = (t.offset, t.scale);
    let sums = tile_sums(t);
    let (m0, m1) = col_masks(offset.len());
    let (o0, o1) =
        (_mm512_maskz_loadu_epi32(m0, offset.as_ptr()), _mm512_maskz_loadu_epi32(m1, offset.as_ptr().wrapping_add(16)));
    let (s0, s1) =
        (_mm512_maskz_loadu_ps(m0, scale.as_ptr()), _mm512_maskz_loadu_ps(m1, scale.as_ptr().wrapping_add(16)));
    let mut out = [[_mm512_setzero_ps(); 2]; MR];
    for (o, s) in out.iter_mut().zip(&sums) {
        o[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[0], o0)), s0);
        o[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[1], o1)), s1);
    }
    (out, (m0, m1))
}

/// One tile of [`product`]: writes its used rows of outputs at `c` (row stride `ldc`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel_store(t: &Tile, c: *mut f32, ldc: usize) {
    use std::arch::x86_64::*;
    let (out, (m0, m1)) = tile_outputs(t);
    for (r, v) in out.iter().enumerate().take(t.rows) {
        let row = c.add(r * ldc);
        _mm512_mask_storeu_ps(row, m0, v[0]);
        _mm512_mask_storeu_ps(row.wrapping_add(16), m1, v[1]);
    }
}

/// One tile of [`product_score`] (the order of [`score_terms`]): `Σ clamp(g·(y_q − y),
/// ±1e10)²` over its used rows, the `g`/`y` values of tile row `r` at `g[r]`/`y[r]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel_score(t: &Tile, g: &[*const f32; MR], y: &[*const f32; MR]) -> f64 {
    use std::arch::x86_64::*;
    let (out, (m0, m1)) = tile_outputs(t);
    let (lo, hi) = (_mm512_set1_ps(-1e10), _mm512_set1_ps(1e10));
    let mut acc = _mm512_setzero_pd();
    for r in 0..t.rows {
        for (h, m) in [(0usize, m0), (1, m1)] {
            let gv = _mm512_maskz_loadu_ps(m, g[r].wrapping_add(16 * h));
            let yv = _mm512_maskz_loadu_ps(m, y[r].wrapping_add(16 * h));
            let t = _mm512_mul_ps(gv, _mm512_sub_ps(out[r][h], yv));
            // clamp; max/min return their second operand when one is NaN, so NaN stays.
            let t = _mm512_min_ps(hi, _mm512_max_ps(lo, t));
            let sq = _mm512_mul_ps(t, t);
            let (s_lo, s_hi) =
                (_mm512_castps512_ps256(sq), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(sq))));
            acc = _mm512_add_pd(acc, _mm512_add_pd(_mm512_cvtps_pd(s_lo), _mm512_cvtps_pd(s_hi)));
        }
    }
    let mut lanes = [0f64; 8];
    _mm512_storeu_pd(lanes.as_mut_ptr(), acc);
    reduce8(lanes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic codes in [-127, 127] (and some at the extremes).
    fn codes(len: usize, seed: u64) -> Vec<i8> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                match i % 17 {
                    0 => 127,
                    1 => -127,
                    _ => (((s >> 33) % 255) as i32 - 127) as i8,
                }
            })
            .collect()
    }

    /// Every output against the exact sum, in f64, on shapes with partial tiles, partial
    /// panels, `k` not a multiple of 4, and a row subset.
    #[test]
    fn integer_products_equal_the_exact_sums() {
        for &(m, k, n) in &[(1, 1, 1), (13, 7, 33), (37, 130, 45), (25, 512, 64), (12, 1537, 32)] {
            let xc =
                IntCodes { rows: m, cols: k, codes: codes(m * k, 1), kind: AmaxKind::PerTensor, divisors: vec![3.5] };
            let wd: Vec<f32> = (0..n).map(|j| 0.25 + j as f32).collect();
            let wc =
                IntCodes { rows: n, cols: k, codes: codes(n * k, 2), kind: AmaxKind::PerRow, divisors: wd.clone() };
            let (xi, wp) = (InputCodes::new(&xc).unwrap(), PackedWeight::new(&wc).unwrap());
            let subset: Vec<u32> = (0..m as u32).rev().step_by(2).collect();
            for rows in [None, Some(subset.as_slice())] {
                let got = product(&xi, rows, &wp).unwrap();
                let picked: Vec<usize> = rows.map_or((0..m).collect(), |r| r.iter().map(|&i| i as usize).collect());
                assert_eq!(got.len(), picked.len() * n);
                for (r, &i) in picked.iter().enumerate() {
                    for j in 0..n {
                        let sum: i64 =
                            (0..k).map(|kk| i64::from(xc.codes[i * k + kk]) * i64::from(wc.codes[j * k + kk])).sum();
                        let want = sum as f64 / (3.5 * f64::from(wd[j]));
                        let g = f64::from(got[r * n + j]);
                        assert!((g - want).abs() <= 4e-7 * want.abs(), "{m}x{k}x{n} [{i}][{j}]: {g} vs {want}");
                    }
                }
            }
        }
        // The fused score: Σ clamp(g·(y_q − y))² against the same sum over `product`'s
        // outputs in f64, with a row subset, a NaN gradient (propagates) and clamping.
        let (m, k, n) = (29, 70, 45);
        let xc = IntCodes { rows: m, cols: k, codes: codes(m * k, 3), kind: AmaxKind::PerTensor, divisors: vec![50.0] };
        let wc = IntCodes { rows: n, cols: k, codes: codes(n * k, 4), kind: AmaxKind::PerRow, divisors: vec![40.0; n] };
        let (xi, wp) = (InputCodes::new(&xc).unwrap(), PackedWeight::new(&wc).unwrap());
        let g: Vec<f32> = (0..m * n).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let y: Vec<f32> = (0..m * n).map(|i| ((i * 104729) % 97) as f32 / 97.0 - 0.5).collect();
        let subset: Vec<u32> = vec![0, 3, 4, 28, 17];
        for rows in [None, Some(subset.as_slice())] {
            let yq = product(&xi, rows, &wp).unwrap();
            let picked: Vec<usize> = rows.map_or((0..m).collect(), |r| r.iter().map(|&i| i as usize).collect());
            let want: f64 = picked
                .iter()
                .enumerate()
                .flat_map(|(r, &i)| (0..n).map(move |j| (r, i, j)))
                .map(|(r, i, j)| {
                    let t = (g[i * n + j] * (yq[r * n + j] - y[i * n + j])).clamp(-1e10, 1e10);
                    f64::from(t * t)
                })
                .sum();
            let got = product_score(&xi, rows, &wp, &g, &y).unwrap();
            assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        }
        let mut big = g.clone();
        big[5] = 1e30; // clamped to 1e10: the sum is at least 1e20
        assert!(product_score(&xi, None, &wp, &big, &y).unwrap() >= 1e20);
        big[5] = f32::NAN;
        assert!(product_score(&xi, None, &wp, &big, &y).unwrap().is_nan());
        assert!(product_score(&xi, None, &wp, &g[1..], &y).is_none());
        // Shapes that do not match are refused.
        let x = InputCodes::new(&IntCodes {
            rows: 2,
            cols: 3,
            codes: vec![1; 6],
            kind: AmaxKind::PerTensor,
            divisors: vec![1.0],
        });
        let w = PackedWeight::new(&IntCodes {
            rows: 2,
            cols: 4,
            codes: vec![1; 8],
            kind: AmaxKind::PerRow,
            divisors: vec![1.0; 2],
        });
        assert!(product(&x.unwrap(), None, &w.unwrap()).is_none());
    }

    /// Every level the CPU has gives the same bits, at 1, 2 and 3 threads: the products and
    /// the fused score (partial tiles and panels, `k` not a multiple of 4, a row subset,
    /// clamped and large terms).
    #[test]
    fn every_level_and_thread_count_gives_the_same_bits() {
        let levels = Level::supported();
        eprintln!("levels compared: {levels:?}");
        let pools: Vec<rayon::ThreadPool> =
            [1, 2, 3].iter().map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap()).collect();
        // The last two cases hold the code −128 in the inputs, then in the weights.
        for (case, &(m, k, n)) in
            [(1, 1, 1), (13, 7, 33), (40, 130, 45), (100, 515, 70), (9, 77, 40), (9, 77, 40)].iter().enumerate()
        {
            let mut x_codes = codes(m * k, 5);
            let mut w_codes = codes(n * k, 6);
            if case == 4 {
                x_codes.iter_mut().step_by(5).for_each(|c| *c = i8::MIN);
            }
            if case == 5 {
                w_codes.iter_mut().step_by(7).for_each(|c| *c = i8::MIN);
            }
            let xc = IntCodes { rows: m, cols: k, codes: x_codes, kind: AmaxKind::PerTensor, divisors: vec![7.5] };
            let wd: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 * 0.3).collect();
            let wc = IntCodes { rows: n, cols: k, codes: w_codes, kind: AmaxKind::PerRow, divisors: wd };
            let xi = InputCodes::new(&xc).unwrap();
            let mut g: Vec<f32> = (0..m * n).map(|i| ((i * 7919) % 101) as f32 / 5.0 - 10.0).collect();
            let y: Vec<f32> = (0..m * n).map(|i| ((i * 104_729) % 97) as f32 - 48.0).collect();
            g[0] = 3e9; // a clamped term
            let subset: Vec<u32> = (0..m as u32).rev().step_by(3).collect();
            let reference = PackedWeight::new_at(&wc, Level::Scalar).unwrap();
            for rows in [None, Some(subset.as_slice())] {
                let want_p: Vec<u32> = product(&xi, rows, &reference).unwrap().iter().map(|v| v.to_bits()).collect();
                let want_s = product_score(&xi, rows, &reference, &g, &y).unwrap().to_bits();
                for &level in &levels {
                    let wp = PackedWeight::new_at(&wc, level).unwrap();
                    for pool in &pools {
                        let threads = pool.current_num_threads();
                        let (p, sc) = pool.install(|| {
                            (product(&xi, rows, &wp).unwrap(), product_score(&xi, rows, &wp, &g, &y).unwrap())
                        });
                        assert!(
                            p.iter().zip(&want_p).all(|(a, b)| a.to_bits() == *b),
                            "product {m}x{k}x{n} at {level:?} on {threads} threads"
                        );
                        assert_eq!(sc.to_bits(), want_s, "score {m}x{k}x{n} at {level:?} on {threads} threads");
                    }
                }
            }
        }
    }

    /// `cargo test -p qpipe-quant --lib bench_int_products -- --ignored --nocapture`:
    /// multiply-adds per second on the mid-size model's shapes (compare `bench_gemm_gflops`).
    #[test]
    #[ignore]
    fn bench_int_products() {
        eprintln!("level: {:?} (QPIPE_SIMD picks a lower one)", simd::level());
        for &(m, k, n) in &[(1024, 512, 1536), (1024, 1536, 512), (1024, 512, 512), (1024, 512, 256)] {
            let xc =
                IntCodes { rows: m, cols: k, codes: codes(m * k, 1), kind: AmaxKind::PerTensor, divisors: vec![1.0] };
            let wc =
                IntCodes { rows: n, cols: k, codes: codes(n * k, 2), kind: AmaxKind::PerRow, divisors: vec![1.0; n] };
            let (xi, wp) = (InputCodes::new(&xc).unwrap(), PackedWeight::new(&wc).unwrap());
            let mut s = f64::MAX;
            for _ in 0..20 {
                let t0 = std::time::Instant::now();
                std::hint::black_box(product(&xi, None, &wp));
                s = s.min(t0.elapsed().as_secs_f64());
            }
            eprintln!("{m}x{k}x{n}: {:.2} ms, {:.1} G(2·MAC)/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
        }
    }
}
