//! f32 matrix products for the Linears and attention, with one result at every vector
//! level.
//!
//! candle's CPU matmul (the `gemm` crate) reaches about a quarter of what PyTorch's oneDNN
//! does on an AVX-512 Xeon, and its summation order follows the CPU's vector width and
//! cache sizes, so its last bits differ between an AVX2 and an AVX-512 machine. This
//! module packs the right-hand side into 32-column panels and runs a register-tiled FMA
//! kernel over 256-deep slices, parallel over row blocks sized so that every thread gets
//! the same share. Each output is, at every level and thread count, the same sequence of
//! operations: `acc = fma(a[i][k], b[k][j], acc)` for `k` in order within a 256-deep
//! slice from `acc = 0`, then `c = acc` for the first slice and `c = acc + c` after it.
//! The level ([`qpipe_compute::simd::level`]) only picks how many outputs are in flight:
//! a 12×32 tile in 24 AVX-512 registers, two 6×16 tiles in 12 AVX2 registers each, or a
//! scalar loop over an exact FMA emulation ([`simd::fma_f32`]). The left operand is packed
//! per micro-tile only for wide outputs (n ≥ 2048), where each packed value serves enough
//! kernel calls to repay the copy. Outputs are written without being zero-filled first.
//! Its speed against PyTorch's is measured by `cargo test -p qpipe-model --lib
//! bench_gemm_gflops -- --ignored --nocapture` (figures in the README; `QPIPE_SIMD` picks
//! the level measured).
//! It is used for contiguous untracked f32 CPU tensors; callers use candle's matmul for
//! anything else (other dtypes, autograd-tracked tensors in tests).

use candle_core::Tensor;
use qpipe_compute::par::SendPtr;
use qpipe_compute::simd::{self, Level};
use rayon::prelude::*;

const MR: usize = 12;
const NR: usize = 32;
const KC: usize = 256;
const MC: usize = 192;
/// Narrowest output for which the A operand is packed (see `sgemm_raw`).
const PACK_A_MIN_N: usize = 2048;

/// How the right-hand operand `b` is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RhsLayout {
    /// `b` is `[n, k]`: the product is `a · bᵀ` (a Linear's forward, `x · wᵀ`).
    Transposed,
    /// `b` is `[k, n]`: the product is `a · b` (a Linear's input gradient, `dy · w`).
    Normal,
}

/// `a: [m, k]` times `b` (see [`RhsLayout`]) as a new `[m, n]` tensor, or `None` when the
/// shapes disagree or an operand is not a contiguous untracked f32 CPU tensor.
pub fn matmul(a: &Tensor, b: &Tensor, layout: RhsLayout) -> Option<Tensor> {
    let (m, k) = a.dims2().ok()?;
    let (b0, b1) = b.dims2().ok()?;
    let n = match layout {
        RhsLayout::Transposed if b1 == k => b0,
        RhsLayout::Normal if b0 == k => b1,
        _ => return None,
    };
    let out = crate::fused::with_f32(a, |a| with_rhs(b, |b| sgemm_rhs(simd::level(), a, m, k, b, n, layout)))??;
    count(m, k, n);
    Tensor::from_vec(out, (m, n), a.device()).ok()
}

/// Floating-point operations (2·m·k·n per product) of every product this module has
/// computed in the process: what a run's achieved GFLOP/s is measured with.
static FLOPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count(m: usize, k: usize, n: usize) {
    FLOPS.fetch_add(2 * (m * k * n) as u64, std::sync::atomic::Ordering::Relaxed);
}

/// The floating-point operations of every product of this module so far (see `FLOPS`).
pub fn flops_done() -> u64 {
    FLOPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A right-hand operand's values: f32, or half precision (a checkpoint's bf16/f16 weights,
/// held as loaded) widened to f32 — exactly — as it is packed, so that a product with a
/// half-precision weight is the product with its f32 copy, bit for bit, without the copy.
#[derive(Clone, Copy)]
enum Rhs<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

/// Runs `f` on the values of `t` in place when `t` is a contiguous untracked f32, bf16 or
/// f16 CPU tensor; `None` otherwise.
fn with_rhs<R>(t: &Tensor, f: impl FnOnce(Rhs<'_>) -> R) -> Option<R> {
    use candle_core::{CpuStorage, Storage};
    if t.track_op() || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (o1, o2) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(Rhs::F32(&v[o1..o2]))),
        Storage::Cpu(CpuStorage::BF16(v)) => Some(f(Rhs::Bf16(&v[o1..o2]))),
        Storage::Cpu(CpuStorage::F16(v)) => Some(f(Rhs::F16(&v[o1..o2]))),
        _ => None,
    }
}

/// A value type the right-hand side can be packed from.
trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Batched product over the leading dims: `a: [.., m, k]` times `b: [.., n, k]`
/// (`Transposed`) or `[.., k, n]` (`Normal`), same leading dims, as `[.., m, n]`.
/// Parallel over the batch.
pub fn batched_matmul(a: &Tensor, b: &Tensor, layout: RhsLayout) -> Option<Tensor> {
    batched(a, b, layout, false)
}

/// [`batched_matmul`] of `aᵀ`: `a: [.., k, m]` (read in place, not transposed first)
/// times `b` as `[.., m, n]`.
pub fn batched_matmul_lhs_t(a: &Tensor, b: &Tensor, layout: RhsLayout) -> Option<Tensor> {
    batched(a, b, layout, true)
}

fn batched(a: &Tensor, b: &Tensor, layout: RhsLayout, a_t: bool) -> Option<Tensor> {
    if a.rank() < 3 || a.rank() != b.rank() {
        return None;
    }
    let r = a.rank();
    let (lead_a, lead_b) = (&a.dims()[..r - 2], &b.dims()[..r - 2]);
    if lead_a != lead_b {
        return None;
    }
    let batch: usize = lead_a.iter().product();
    let (m, k) = if a_t { (a.dims()[r - 1], a.dims()[r - 2]) } else { (a.dims()[r - 2], a.dims()[r - 1]) };
    let (b0, b1) = (b.dims()[r - 2], b.dims()[r - 1]);
    let n = match layout {
        RhsLayout::Transposed if b1 == k => b0,
        RhsLayout::Normal if b0 == k => b1,
        _ => return None,
    };
    let out = crate::fused::with_f32(a, |a| {
        crate::fused::with_f32(b, |b| {
            let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
            let op = SendPtr(out.as_mut_ptr());
            (0..batch).into_par_iter().for_each(|i| {
                let op = &op;
                // SAFETY: product `i` writes exactly the `m·n` values at offset `i·m·n` of the
                // `batch·m·n` allocated; the products' ranges are disjoint.
                unsafe {
                    sgemm_raw(
                        simd::level(),
                        &a[i * m * k..(i + 1) * m * k],
                        m,
                        k,
                        Rhs::F32(&b[i * k * n..(i + 1) * k * n]),
                        n,
                        layout,
                        a_t,
                        op.0.add(i * m * n),
                    )
                };
            });
            // SAFETY: every one of the `batch·m·n` values was written above.
            unsafe { out.set_len(batch * m * n) };
            out
        })
    })??;
    count(batch * m, k, n);
    let mut shape = lead_a.to_vec();
    shape.extend([m, n]);
    Tensor::from_vec(out, shape, a.device()).ok()
}

/// [`pack_rhs_of`] of any [`Rhs`].
fn pack_rhs(b: Rhs<'_>, k: usize, n: usize, layout: RhsLayout) -> Vec<f32> {
    match b {
        Rhs::F32(b) => pack_rhs_of(b, k, n, layout),
        Rhs::Bf16(b) => pack_rhs_of(b, k, n, layout),
        Rhs::F16(b) => pack_rhs_of(b, k, n, layout),
    }
}

/// Packs `b` into `ceil(n/NR)` panels of `[k][NR]` (zero-padded columns), widened to f32.
fn pack_rhs_of<T: Widen>(b: &[T], k: usize, n: usize, layout: RhsLayout) -> Vec<f32> {
    let np = n.div_ceil(NR);
    let mut packed = vec![0f32; np * k * NR];
    packed.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| {
        let j0 = p * NR;
        let cols = NR.min(n - j0);
        match layout {
            RhsLayout::Transposed => {
                for (kk, d) in panel.chunks_exact_mut(NR).enumerate() {
                    for (c, d) in d[..cols].iter_mut().enumerate() {
                        *d = b[(j0 + c) * k + kk].widen();
                    }
                }
            }
            RhsLayout::Normal => {
                for kk in 0..k {
                    for (d, s) in panel[kk * NR..kk * NR + cols].iter_mut().zip(&b[kk * n + j0..kk * n + j0 + cols]) {
                        *d = s.widen();
                    }
                }
            }
        }
    });
    packed
}

/// `a · b` (see [`RhsLayout`]) as a new row-major `[m, n]` vector.
#[cfg(test)]
fn sgemm(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, layout: RhsLayout) -> Vec<f32> {
    sgemm_at(simd::level(), a, m, k, b, n, layout)
}

/// [`sgemm`] with the kernels of `level` (at most [`simd::detected`]).
#[cfg(test)]
fn sgemm_at(level: Level, a: &[f32], m: usize, k: usize, b: &[f32], n: usize, layout: RhsLayout) -> Vec<f32> {
    sgemm_rhs(level, a, m, k, Rhs::F32(b), n, layout)
}

/// [`sgemm_at`] of any [`Rhs`].
fn sgemm_rhs(level: Level, a: &[f32], m: usize, k: usize, b: Rhs<'_>, n: usize, layout: RhsLayout) -> Vec<f32> {
    assert!(level <= simd::detected(), "{level:?} kernels on a CPU without them");
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `sgemm_raw` writes all `m·n` values at `c` (no zero-fill needed first).
    unsafe {
        sgemm_raw(level, a, m, k, b, n, layout, false, c.as_mut_ptr());
        c.set_len(m * n);
    }
    c
}

/// Writes `a · b` to the `m·n` row-major values at `c`, every one of them, without
/// reading them first. `a` is `[m, k]`, or `[k, m]` holding `aᵀ` when `a_t`.
///
/// # Safety
/// `c` must be valid for writes of `m·n` values, and the CPU must support `level`.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_raw(
    level: Level,
    a: &[f32],
    m: usize,
    k: usize,
    b: Rhs<'_>,
    n: usize,
    layout: RhsLayout,
    a_t: bool,
    c: *mut f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        std::ptr::write_bytes(c, 0, m * n);
        return;
    }
    let packed = pack_rhs(b, k, n, layout);
    let np = n.div_ceil(NR);
    let cp = SendPtr(c);
    // Row blocks of whole micro-tiles, as many as keep every thread busy to the end: at
    // least four per thread, at most MC rows each.
    let tiles = m.div_ceil(MR);
    let want = 4 * rayon::current_num_threads();
    let mc = MR * tiles.div_ceil(want).clamp(1, MC / MR);
    (0..m.div_ceil(mc)).into_par_iter().for_each(|bi| {
        let cp = &cp;
        let i0 = bi * mc;
        let rows = mc.min(m - i0);
        // This block's rows of `a`, packed per micro-tile as [kc][MR] so the kernel's
        // broadcasts read consecutive floats — when `n` is wide enough to repay the copy
        // (a packed value serves n/NR kernel calls); else the kernel reads `a` in place.
        // A transposed `a` needs no packing: its MR rows at one `k` are consecutive.
        let pack_a = n >= PACK_A_MIN_N && !a_t;
        let mut apack = if pack_a { vec![0f32; rows.div_ceil(MR) * MR * KC] } else { Vec::new() };
        for kb in (0..k).step_by(KC) {
            let kc = KC.min(k - kb);
            for (t, dst) in apack.chunks_mut(MR * KC).enumerate() {
                let r0 = t * MR;
                let mr = MR.min(rows - r0);
                // Row-interleaved: consecutive writes, `mr` sequential read streams.
                let base = (i0 + r0) * k + kb;
                for (kk, d) in dst.chunks_exact_mut(MR).take(kc).enumerate() {
                    for (r, d) in d[..mr].iter_mut().enumerate() {
                        *d = a[base + r * k + kk];
                    }
                }
            }
            for p in 0..np {
                let panel = &packed[p * k * NR + kb * NR..p * k * NR + (kb + kc) * NR];
                let cols = NR.min(n - p * NR);
                for t in 0..rows.div_ceil(MR) {
                    let r0 = t * MR;
                    let mr = MR.min(rows - r0);
                    // (values, row stride, k stride) of this tile's `a`
                    let (ap, rs, ks) = if pack_a {
                        (&apack[t * MR * KC..(t + 1) * MR * KC], 1, MR)
                    } else if a_t {
                        (&a[kb * m + i0 + r0..], 1, m)
                    } else {
                        (&a[(i0 + r0) * k + kb..], k, 1)
                    };
                    // SAFETY: the kernel reads `a` at `r·rs + kk·ks` for r < mr, kk < kc and
                    // `kc·NR` values of `panel` (inside the slices), and writes (and, from the
                    // second `kb` on, reads back) `cols` values of `mr` rows at stride `n`
                    // from `c_blk`: rows `i0 + r0 ..` of this thread's own block, inside the
                    // `m·n` output.
                    let c_blk = cp.0.add((i0 + r0) * n + p * NR);
                    let args = KernelArgs {
                        a: ap,
                        row_stride: rs,
                        k_stride: ks,
                        kc,
                        panel,
                        c: c_blk,
                        ldc: n,
                        cols,
                        accumulate: kb > 0,
                    };
                    tile(level, mr, &args);
                }
            }
        }
    });
}

/// One register tile's work for the kernels.
struct KernelArgs<'a> {
    /// The tile's left operand: `A[r][kk]` is `a[r·row_stride + kk·k_stride]`.
    a: &'a [f32],
    row_stride: usize,
    k_stride: usize,
    /// Depth of this slice of the product.
    kc: usize,
    /// The packed B panel, `[kc][NR]`.
    panel: &'a [f32],
    /// The tile's first output value, rows `ldc` apart.
    c: *mut f32,
    ldc: usize,
    /// Output columns to write (≤ NR).
    cols: usize,
    /// Add to C instead of overwriting it (every k slice after the first).
    accumulate: bool,
}

impl KernelArgs<'_> {
    /// The same tile without its first `r` rows.
    fn skip_rows(&self, r: usize) -> KernelArgs<'_> {
        KernelArgs {
            a: &self.a[r * self.row_stride..],
            // SAFETY (of later writes): rows past `r` of the tile are inside the output.
            c: self.c.wrapping_add(r * self.ldc),
            ..*self
        }
    }
}

/// `C[mr × cols] (+)= A[mr × kc] · panel[kc × NR]` at `level` (see the module doc: the same
/// bits at every level).
///
/// # Safety
/// As [`sgemm_raw`]'s tiles: `args` addresses `mr ≤ MR` rows inside `a` and the output.
unsafe fn tile(level: Level, mr: usize, args: &KernelArgs) {
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx512 {
        match mr {
            12 => kernel_avx512::<12>(args),
            11 => kernel_avx512::<11>(args),
            10 => kernel_avx512::<10>(args),
            9 => kernel_avx512::<9>(args),
            8 => kernel_avx512::<8>(args),
            7 => kernel_avx512::<7>(args),
            6 => kernel_avx512::<6>(args),
            5 => kernel_avx512::<5>(args),
            4 => kernel_avx512::<4>(args),
            3 => kernel_avx512::<3>(args),
            2 => kernel_avx512::<2>(args),
            _ => kernel_avx512::<1>(args),
        }
        return;
    } else if level >= Level::Avx2 {
        // Two tiles of at most 6 rows (6 × 16 columns in 12 registers).
        let avx2 = |rows: usize, args: &KernelArgs| match rows {
            6 => kernel_avx2::<6>(args),
            5 => kernel_avx2::<5>(args),
            4 => kernel_avx2::<4>(args),
            3 => kernel_avx2::<3>(args),
            2 => kernel_avx2::<2>(args),
            _ => kernel_avx2::<1>(args),
        };
        avx2(mr.min(6), args);
        if mr > 6 {
            avx2(mr - 6, &args.skip_rows(6));
        }
        return;
    }
    let _ = level;
    kernel_scalar(mr, args);
}

/// The AVX-512 tile: `R × 32` outputs in `2R` registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const R: usize>(args: &KernelArgs<'_>) {
    let &KernelArgs { a, row_stride: rs, k_stride: ks, kc, panel, c, ldc, cols, accumulate } = args;
    use std::arch::x86_64::*;
    debug_assert!(a.len() > (R - 1) * rs + (kc - 1) * ks && panel.len() >= kc * NR && cols <= NR && ldc >= cols);
    let ap = a.as_ptr();
    let bp = panel.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for kk in 0..kc {
        let b0 = _mm512_loadu_ps(bp.add(kk * NR));
        let b1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(kk * ks + r * rs));
            acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
        }
    }
    let m0: __mmask16 = if cols >= 16 { 0xFFFF } else { ((1u32 << cols) - 1) as __mmask16 };
    let m1: __mmask16 = if cols >= 32 {
        0xFFFF
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as __mmask16
    } else {
        0
    };
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row.add(16), m1, v1);
    }
}

/// The AVX2 tile: `R ≤ 6` rows, the panel's 32 columns as two halves of `R × 16` outputs
/// in `2R` registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<const R: usize>(args: &KernelArgs<'_>) {
    let &KernelArgs { a, row_stride: rs, k_stride: ks, kc, panel, c, ldc, cols, accumulate } = args;
    use std::arch::x86_64::*;
    debug_assert!(R <= 6 && a.len() > (R - 1) * rs + (kc - 1) * ks && panel.len() >= kc * NR && cols <= NR);
    let ap = a.as_ptr();
    for c0 in (0..cols).step_by(16) {
        let bp = panel.as_ptr().add(c0);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(bp.add(kk * NR));
            let b1 = _mm256_loadu_ps(bp.add(kk * NR + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*ap.add(kk * ks + r * rs));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                let cc = c0 + 8 * h;
                if cc >= cols {
                    break;
                }
                let row = c.add(r * ldc + cc);
                if cols - cc >= 8 {
                    let v = if accumulate { _mm256_add_ps(v, _mm256_loadu_ps(row)) } else { v };
                    _mm256_storeu_ps(row, v);
                } else {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    for (i, &x) in lanes[..cols - cc].iter().enumerate() {
                        *row.add(i) = if accumulate { x + *row.add(i) } else { x };
                    }
                }
            }
        }
    }
}

/// The scalar tile: one row at a time, [`simd::fma_f32`] (one rounding, as the vector FMAs).
unsafe fn kernel_scalar(rows: usize, args: &KernelArgs<'_>) {
    let &KernelArgs { a, row_stride: rs, k_stride: ks, kc, panel, c, ldc, cols, accumulate } = args;
    for r in 0..rows {
        let mut acc = [0f32; NR];
        for kk in 0..kc {
            let av = a[kk * ks + r * rs];
            for (acc, &b) in acc[..cols].iter_mut().zip(&panel[kk * NR..kk * NR + cols]) {
                *acc = simd::fma_f32(av, b, *acc);
            }
        }
        let row = c.add(r * ldc);
        for (i, &x) in acc[..cols].iter().enumerate() {
            *row.add(i) = if accumulate { x + *row.add(i) } else { x };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_matmul_on_odd_shapes() {
        let dev = Device::Cpu;
        // n ≥ PACK_A_MIN_N packs A, narrower products read it in place: both are covered.
        for &(m, k, n) in
            &[(1, 1, 1), (7, 3, 5), (70, 300, 33), (129, 513, 64), (64, 256, 32), (9, 600, 100), (29, 300, 2100)]
        {
            let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let want = a.matmul(&w.t().unwrap()).unwrap();
            let got = matmul(&a, &w, RhsLayout::Transposed).unwrap();
            let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-4 * (k as f32).sqrt(), "a·wᵀ {m}x{k}x{n}: max diff {d}");
            let wt = w.t().unwrap().contiguous().unwrap();
            let got = matmul(&a, &wt, RhsLayout::Normal).unwrap();
            let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-4 * (k as f32).sqrt(), "a·b {m}x{k}x{n}: max diff {d}");
        }
        // batched, both layouts
        let a = Tensor::randn(0f32, 1.0, (2, 3, 20, 16), &dev).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (2, 3, 40, 16), &dev).unwrap();
        let want = a.matmul(&bt.t().unwrap()).unwrap();
        let got = batched_matmul(&a, &bt, RhsLayout::Transposed).unwrap();
        assert!((&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
        let bn = bt.t().unwrap().contiguous().unwrap();
        let got = batched_matmul(&a, &bn, RhsLayout::Normal).unwrap();
        assert!((&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
        // aᵀ read in place, both layouts, with partial tiles (m = 20, 13) and k = 300
        for (m, k) in [(20, 16), (13, 300)] {
            let at = Tensor::randn(0f32, 1.0, (2, 3, k, m), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (2, 3, k, 40), &dev).unwrap();
            let want = at.t().unwrap().matmul(&b).unwrap();
            let got = batched_matmul_lhs_t(&at, &b, RhsLayout::Normal).unwrap();
            let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(got.dims() == [2, 3, m, 40] && d < 1e-4 * (k as f32).sqrt(), "{m}x{k}: {d}");
            let bt = b.t().unwrap().contiguous().unwrap();
            let got = batched_matmul_lhs_t(&at, &bt, RhsLayout::Transposed).unwrap();
            let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4 * (k as f32).sqrt(), "{m}x{k} (bᵀ): {d}");
        }
        // shape mismatch → not handled
        let a = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(matmul(&a, &a, RhsLayout::Normal).is_none());
    }
}

/// The same bits at every vector level the CPU has and at 1, 2 and 3 threads, on shapes
/// with partial tiles and panels, several 256-deep slices, a packed `a` (n ≥ 2048), both
/// layouts of `b` and a transposed `a` (the batched path).
#[cfg(test)]
mod same_bits {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 3.0
            })
            .collect()
    }

    #[test]
    fn every_level_and_thread_count_gives_the_same_bits() {
        let levels = Level::supported();
        eprintln!("levels compared: {levels:?}");
        let pools: Vec<rayon::ThreadPool> =
            [1, 2, 3].iter().map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap()).collect();
        for &(m, k, n) in &[(1, 1, 1), (13, 7, 33), (25, 600, 70), (37, 513, 2100), (7, 300, 17)] {
            let a = values(m * k, 1);
            let b = values(n * k, 2);
            for layout in [RhsLayout::Transposed, RhsLayout::Normal] {
                let want: Vec<u32> =
                    sgemm_at(Level::Scalar, &a, m, k, &b, n, layout).iter().map(|v| v.to_bits()).collect();
                for &level in &levels {
                    for pool in &pools {
                        let got = pool.install(|| sgemm_at(level, &a, m, k, &b, n, layout));
                        let same = got.iter().zip(&want).filter(|(g, w)| g.to_bits() == **w).count();
                        assert_eq!(
                            same,
                            want.len(),
                            "{m}x{k}x{n} {layout:?} at {level:?} on {} threads",
                            pool.current_num_threads()
                        );
                    }
                }
                // aᵀ read in place: `a` holds the transpose, [k, m].
                let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                for &level in &levels {
                    let mut got = vec![0f32; m * n];
                    // SAFETY: `got` holds `m·n` values; `level` is at most the CPU's.
                    unsafe { sgemm_raw(level, &at, m, k, Rhs::F32(&b), n, layout, true, got.as_mut_ptr()) };
                    assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == *w), "aᵀ {m}x{k}x{n} at {level:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore]
    fn bench_pack() {
        let b = vec![1f32; 1536 * 512];
        for layout in [RhsLayout::Transposed, RhsLayout::Normal] {
            let mut s = f64::MAX;
            for _ in 0..20 {
                let t0 = std::time::Instant::now();
                std::hint::black_box(pack_rhs(Rhs::F32(&b), 512, 1536, layout));
                s = s.min(t0.elapsed().as_secs_f64());
            }
            eprintln!("pack {layout:?} 1536x512: {:.2} ms", s * 1e3);
        }
    }

    #[test]
    #[ignore]
    fn bench_attention_bmm() {
        let dev = candle_core::Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (8, 4, 256, 64), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (8, 4, 128, 64), &dev).unwrap();
        let (mut c, mut f) = (f64::MAX, f64::MAX);
        for _ in 0..20 {
            let t0 = std::time::Instant::now();
            std::hint::black_box(q.matmul(&k.t().unwrap()).unwrap());
            c = c.min(t0.elapsed().as_secs_f64());
            let t0 = std::time::Instant::now();
            std::hint::black_box(batched_matmul(&q, &k, RhsLayout::Transposed));
            f = f.min(t0.elapsed().as_secs_f64());
        }
        eprintln!("q·kᵀ [8,4,256,64]x[8,4,128,64]: candle {:.2} ms, avx512 batched {:.2} ms", c * 1e3, f * 1e3);
    }

    #[test]
    #[ignore]
    fn bench_gemm_gflops() {
        for &(m, k, n) in
            &[(1024, 512, 1536), (1024, 1536, 512), (1024, 512, 512), (1024, 512, 4096), (4096, 512, 1536)]
        {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
            for layout in [RhsLayout::Transposed, RhsLayout::Normal] {
                let mut s = f64::MAX;
                for _ in 0..10 {
                    let t0 = std::time::Instant::now();
                    std::hint::black_box(sgemm(&a, m, k, &b, n, layout));
                    s = s.min(t0.elapsed().as_secs_f64());
                }
                eprintln!(
                    "{m}x{k}x{n} {layout:?}: {:.2} ms {:.1} GFLOP/s",
                    s * 1e3,
                    2.0 * (m * k * n) as f64 / s / 1e9
                );
            }
        }
    }

    /// The single-GEMM rate at Qwen3-VL-4B's MLP shapes for a batch of 8 × 512 (the
    /// reference `scripts/bench_4b.sh` compares a whole scoring run's rate with):
    /// `cargo test -p qpipe-model --lib bench_gemm_4b_shapes -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_gemm_4b_shapes() {
        for &(m, k, n, layout) in &[
            (4096, 2560, 9728, RhsLayout::Transposed),
            (4096, 9728, 2560, RhsLayout::Transposed),
            (4096, 9728, 2560, RhsLayout::Normal),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut s = f64::MAX;
            for _ in 0..3 {
                let t0 = std::time::Instant::now();
                std::hint::black_box(sgemm(&a, m, k, &b, n, layout));
                s = s.min(t0.elapsed().as_secs_f64());
            }
            eprintln!("{m}x{k}x{n} {layout:?}: {:.0} ms {:.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
        }
    }
}
