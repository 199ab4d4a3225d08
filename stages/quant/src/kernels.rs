//! The GPU side of fake quantization: which kernels of `kernels.cu` to launch, with which
//! arguments, to fake-quantize a `[rows, cols]` tensor with a [`Quantizer`].
//!
//! The plan is plain data, so the same plan drives the CUDA executor (`quant::cuda`, with
//! the `cuda` feature) and the test suite's CPU emulation of the kernels (the `.cu` file
//! compiled as C), which checks them bit for bit against the Rust quantizers on machines
//! without a GPU.
//!
//! Buffers every kernel sees: `x` (input), `y` (output), `ranges` (one amax per group:
//! uploaded calibrated ranges, or computed by the `qp_amax*` launches), `bad` (set when a
//! range saw NaN/Inf).

use anyhow::{bail, ensure, Context, Result};

use crate::observer::AmaxKind;
use crate::types::{NumBits, Quantizer, RangeSource, Scheme};

/// The CUDA C source of the kernels.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Elements per partial maximum when reducing a whole tensor in two steps.
pub const TENSOR_CHUNK: usize = 4096;

/// Launch arguments, passed by value; the layout of `qp_args` in `kernels.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelArgs {
    /// Threads that do work.
    pub count: i64,
    pub rows: i64,
    pub cols: i64,
    /// Block length (kind 3).
    pub n: i64,
    /// 0 tensor, 1 row, 2 column, 3 block.
    pub kind: i32,
    /// `qp_int`: unsigned; `qp_mx`: E2M1 elements.
    pub flag: i32,
    pub f0: f32,
    pub f1: f32,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub args: KernelArgs,
}

/// Everything needed to fake-quantize one tensor on the device.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelPlan {
    /// Length of the `ranges` buffer.
    pub ranges_len: usize,
    /// Ranges to upload into `ranges` before the launches (calibrated ones).
    pub upload: Option<Vec<f32>>,
    /// Whether the launches compute ranges from the tensor (then NaN/Inf is an error).
    pub computes_ranges: bool,
    pub launches: Vec<Launch>,
}

fn kind_code(kind: AmaxKind) -> (i32, i64) {
    match kind {
        AmaxKind::PerTensor => (0, 0),
        AmaxKind::PerRow => (1, 0),
        AmaxKind::PerCol => (2, 0),
        AmaxKind::PerBlock(n) => (3, n as i64),
    }
}

/// Launches that compute the `kind` ranges of `x` `[rows, cols]` into `ranges`; returns
/// them and the length of `ranges` they need.
fn range_launches(kind: AmaxKind, rows: usize, cols: usize) -> (Vec<Launch>, usize) {
    let numel = rows * cols;
    if kind == AmaxKind::PerTensor {
        // Partial maxima over chunks of the flattened tensor, then one thread over those.
        let parts = numel.div_ceil(TENSOR_CHUNK).max(1);
        let chunks = KernelArgs {
            count: parts as i64,
            rows: 1,
            cols: numel as i64,
            n: TENSOR_CHUNK as i64,
            kind: 3,
            ..Default::default()
        };
        let reduce = KernelArgs { count: parts as i64, ..Default::default() };
        return (
            vec![Launch { kernel: "qp_amax", args: chunks }, Launch { kernel: "qp_amax_reduce", args: reduce }],
            parts,
        );
    }
    let (code, n) = kind_code(kind);
    let len = kind.len(rows, cols);
    let args =
        KernelArgs { count: len as i64, rows: rows as i64, cols: cols as i64, n, kind: code, ..Default::default() };
    (vec![Launch { kernel: "qp_amax", args }], len)
}

/// The launches that compute the `kind` ranges of a `[rows, cols]` tensor (the first
/// `kind.len(rows, cols)` values of `ranges` afterwards).
pub fn range_plan(kind: AmaxKind, rows: usize, cols: usize) -> KernelPlan {
    let (launches, ranges_len) = range_launches(kind, rows, cols);
    KernelPlan { ranges_len, upload: None, computes_ranges: true, launches }
}

/// The launches that fake-quantize `x` `[rows, cols]` with `q`; `None` when `q` is off
/// (the tensor passes unchanged). Errors as [`Quantizer::fake_quant`] does on missing or
/// mis-shaped calibrated ranges.
pub fn plan(q: &Quantizer, rows: usize, cols: usize, ranges: RangeSource<'_>) -> Result<Option<KernelPlan>> {
    ensure!(rows > 0 && cols > 0, "cannot fake-quantize an empty [{rows}, {cols}] tensor on the GPU");
    let (kind, elementwise) = match q.scheme() {
        Scheme::Off => return Ok(None),
        Scheme::Scaled { kind, dynamic, .. } => (*kind, (!*dynamic).then_some(*kind)),
        Scheme::Nvfp4 { global_dynamic, .. } => {
            (AmaxKind::PerTensor, (!*global_dynamic).then_some(AmaxKind::PerTensor))
        }
        Scheme::Mx { .. } => (AmaxKind::PerTensor, None),
    };
    // Ranges: uploaded (calibrated), computed from the tensor, or none (MX).
    let calibrated = match ranges {
        RangeSource::Calibrated(amax) => match elementwise {
            Some(k) => Some(q.calibrated(amax, k, rows, cols)?.values.clone()),
            None => None,
        },
        RangeSource::FromTensor => None,
    };
    let mut plan = KernelPlan { ranges_len: 1, upload: None, computes_ranges: false, launches: vec![] };
    if !matches!(q.scheme(), Scheme::Mx { .. }) {
        match calibrated {
            Some(v) => {
                plan.ranges_len = v.len();
                plan.upload = Some(v);
            }
            None => {
                let (launches, len) = range_launches(kind, rows, cols);
                plan.ranges_len = len;
                plan.computes_ranges = true;
                plan.launches = launches;
            }
        }
    }
    let numel = (rows * cols) as i64;
    let base = KernelArgs { rows: rows as i64, cols: cols as i64, ..Default::default() };
    let launch = match q.scheme() {
        Scheme::Off => unreachable!("handled above"),
        Scheme::Scaled { elem, kind, .. } => {
            let (code, n) = kind_code(*kind);
            let args = KernelArgs { count: numel, kind: code, n, ..base };
            match *elem {
                NumBits::Int(bits) => {
                    if q.is_unsigned() {
                        bail!("unsigned integer quantizers are not supported on the GPU; score on the CPU");
                    }
                    let max_bound = (2.0f64.powi(i32::from(bits) - 1) - 1.0) as f32;
                    let min_bound = if q.is_narrow_range() { -max_bound } else { -max_bound - 1.0 };
                    Launch { kernel: "qp_int", args: KernelArgs { f0: max_bound, f1: min_bound, ..args } }
                }
                NumBits::FP8_E4M3 => Launch { kernel: "qp_fp8", args },
                e => bail!("no scaled fake quantization for num_bits {}", e.label()),
            }
        }
        Scheme::Nvfp4 { block, .. } => {
            let count = (rows * cols.div_ceil(*block)) as i64;
            Launch { kernel: "qp_nvfp4", args: KernelArgs { count, kind: 3, n: *block as i64, ..base } }
        }
        Scheme::Mx { elem, block } => {
            let elem_max = elem.element_max().with_context(|| format!("no MX element format {}", elem.label()))?;
            let count = (rows * cols.div_ceil(*block)) as i64;
            let flag = i32::from(*elem == NumBits::FP4_E2M1);
            Launch {
                kernel: "qp_mx",
                args: KernelArgs { count, kind: 3, n: *block as i64, flag, f0: elem_max, ..base },
            }
        }
    };
    plan.launches.push(launch);
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observer::Amax;
    use crate::types::Role;

    #[test]
    fn kernel_args_match_the_c_layout() {
        // 4 × i64, 2 × i32, 2 × f32, no padding: what `qp_args` is in C on every target.
        assert_eq!(std::mem::size_of::<KernelArgs>(), 48);
        assert_eq!(std::mem::align_of::<KernelArgs>(), 8);
    }

    #[test]
    fn whole_tensor_ranges_reduce_in_two_steps() {
        let q = Quantizer::new(
            Scheme::Scaled { elem: NumBits::FP8_E4M3, kind: AmaxKind::PerTensor, dynamic: true },
            Role::Weight,
            false,
            false,
        );
        let p = plan(&q, 3, 5000, RangeSource::Calibrated(None)).unwrap().unwrap();
        let names: Vec<_> = p.launches.iter().map(|l| l.kernel).collect();
        assert_eq!(names, ["qp_amax", "qp_amax_reduce", "qp_fp8"]);
        assert_eq!(p.ranges_len, 15000usize.div_ceil(TENSOR_CHUNK));
        assert!(p.computes_ranges && p.upload.is_none());
        assert_eq!(p.launches[2].args.count, 15000);
    }

    #[test]
    fn static_ranges_are_uploaded_and_checked() {
        let q = Quantizer::new(
            Scheme::Scaled { elem: NumBits::Int(8), kind: AmaxKind::PerTensor, dynamic: false },
            Role::Input,
            false,
            false,
        );
        assert!(plan(&q, 2, 4, RangeSource::Calibrated(None)).unwrap_err().to_string().contains("calibration"));
        let wrong = Amax { kind: AmaxKind::PerRow, values: vec![1.0, 2.0] };
        assert!(plan(&q, 2, 4, RangeSource::Calibrated(Some(&wrong))).is_err());
        let a = Amax::per_tensor(3.0);
        let p = plan(&q, 2, 4, RangeSource::Calibrated(Some(&a))).unwrap().unwrap();
        assert_eq!(p.upload, Some(vec![3.0]));
        assert_eq!(p.launches.len(), 1);
        assert_eq!((p.launches[0].args.f0, p.launches[0].args.f1), (127.0, -128.0));
        // A weight's ranges come from the weight itself.
        let p = plan(&q, 2, 4, RangeSource::FromTensor).unwrap().unwrap();
        assert!(p.computes_ranges && p.upload.is_none());
        let off = Quantizer::new(Scheme::Off, Role::Input, false, false);
        assert!(plan(&off, 2, 4, RangeSource::FromTensor).unwrap().is_none());
    }
}
