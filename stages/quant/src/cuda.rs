//! Runs [`crate::kernels`] plans on an NVIDIA GPU: the kernels are compiled once per
//! process with NVRTC (`--fmad=false`, so they round exactly as the Rust quantizers do)
//! and launched on candle's CUDA stream, reading and writing candle's device buffers. No
//! data goes through the host except calibrated ranges (up) and computed ones plus a
//! NaN flag (down, a few bytes).

use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::kernels::{self, KernelArgs, KernelPlan};
use crate::observer::AmaxKind;
use crate::types::Quantizer;
use crate::types::RangeSource;

// SAFETY: `KernelArgs` is `#[repr(C)]` plain data with the layout of `qp_args`
// (`kernels::tests::kernel_args_match_the_c_layout`).
unsafe impl DeviceRepr for KernelArgs {}

const MODULE: &str = "qpipe_fake_quant";

/// The kernels' PTX, compiled on first use.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = cudarc::nvrtc::CompileOptions {
            fmad: Some(false),
            ftz: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            name: Some("kernels.cu".into()),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(kernels::SOURCE, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(|e| anyhow::anyhow!("compiling qpipe's fake-quant kernels with NVRTC failed: {e}"))
}

/// Runs `plan` on `x` (f32, contiguous, on `dev`); returns `y` (when the plan quantizes),
/// the ranges buffer (downloaded when `download_ranges`) and whether a computed range saw
/// NaN/Inf.
fn execute(
    plan: &KernelPlan,
    dev: &candle_core::CudaDevice,
    x: &cudarc::driver::CudaView<'_, f32>,
    numel: usize,
    download_ranges: bool,
) -> candle_core::Result<(CudaSlice<f32>, Vec<f32>, bool)> {
    use candle_core::cuda_backend::WrapErr;
    let ptx = ptx().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let stream = dev.cuda_stream();
    // SAFETY: every element of `y` that a caller reads is written by the plan's last kernel.
    let mut y = unsafe { dev.alloc::<f32>(numel.max(1))? };
    let mut ranges = match &plan.upload {
        Some(v) => stream.clone_htod(v).w()?,
        None => dev.alloc_zeros::<f32>(plan.ranges_len.max(1))?,
    };
    let mut bad = dev.alloc_zeros::<u32>(1)?;
    for l in &plan.launches {
        let func = dev.get_or_load_custom_func(l.kernel, MODULE, ptx)?;
        let threads = if l.kernel == "qp_amax_reduce" { 1 } else { l.args.count as u32 };
        let cfg = LaunchConfig::for_num_elems(threads.max(1));
        let mut b = func.builder();
        b.arg(x);
        b.arg(&mut y);
        b.arg(&mut ranges);
        b.arg(&mut bad);
        b.arg(&l.args);
        // SAFETY: the kernels bound every access by the sizes in `l.args`, which the plan
        // derived from `numel` and `plan.ranges_len`, the sizes of these buffers.
        unsafe { b.launch(cfg) }.w()?;
    }
    let bad = plan.computes_ranges && stream.clone_dtoh(&bad).w()?[0] != 0;
    let r = if download_ranges { stream.clone_dtoh(&ranges).w()? } else { vec![] };
    Ok((y, r, bad))
}

/// A fake quantization as a candle op (so the output is a candle tensor on the device).
struct FakeQuantOp {
    plan: KernelPlan,
}

impl CustomOp1 for FakeQuantOp {
    fn name(&self) -> &'static str {
        "qpipe-fake-quant"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("internal error: the GPU fake-quant op was applied to a CPU tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("internal error: the GPU fake-quant op needs a contiguous tensor")
        };
        let x = s.as_cuda_slice::<f32>()?.slice(start..end);
        let (y, _, bad) = execute(&self.plan, &s.device, &x, end - start, false)?;
        if bad {
            candle_core::bail!("tensor contains NaN or infinite values");
        }
        Ok((CudaStorage::wrap_cuda_slice(y, s.device.clone()), l.shape().clone()))
    }
}

/// [`crate::device::fake_quant`] on a CUDA tensor.
pub fn fake_quant(q: &Quantizer, t: &Tensor, ranges: RangeSource<'_>) -> Result<Tensor> {
    let (rows, cols) = crate::types::rows_cols(t.dims())?;
    let Some(plan) = kernels::plan(q, rows, cols, ranges)? else { return Ok(t.to_dtype(DType::F32)?) };
    let x = t.to_dtype(DType::F32)?.contiguous()?;
    x.apply_op1_no_bwd(&FakeQuantOp { plan }).context("fake-quantizing on the GPU")
}

/// [`crate::device::ranges`] on a CUDA tensor.
pub fn ranges(kind: AmaxKind, t: &Tensor) -> Result<(Vec<f32>, bool)> {
    let (rows, cols) = crate::types::rows_cols(t.dims())?;
    let plan = kernels::range_plan(kind, rows, cols);
    let x = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { bail!("internal error: a CPU tensor was passed to the GPU range kernels") };
    let (start, end) = layout.contiguous_offsets().context("internal error: not contiguous")?;
    let view = s.as_cuda_slice::<f32>()?.slice(start..end);
    let (_, mut r, bad) = execute(&plan, &s.device, &view, end - start, true)?;
    r.truncate(kind.len(rows, cols));
    Ok((r, bad))
}

#[cfg(test)]
mod tests {
    //! Need the `cuda` feature; the GPU tests skip loudly without a device.
    use super::*;
    use crate::types::{NumBits, Role};
    use crate::Scheme;

    #[test]
    fn kernels_compile_with_nvrtc() {
        // NVRTC needs no GPU: this runs wherever the CUDA build runs.
        let ptx = ptx().unwrap();
        for k in ["qp_amax", "qp_amax_reduce", "qp_int", "qp_fp8", "qp_nvfp4", "qp_mx"] {
            assert!(ptx.contains(&format!(".entry {k}(")), "{k} missing from the PTX");
        }
    }

    #[test]
    fn gpu_kernels_equal_the_rust_quantizers() {
        if qpipe_compute::device::cuda_device_count() == 0 {
            eprintln!("SKIPPED: no CUDA device; the GPU fake-quant kernels did not run");
            return;
        }
        let dev = candle_core::Device::new_cuda(0).unwrap();
        let (rows, cols) = (64, 512 + 96);
        let x: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1.0 + (i % 13) as f32)).collect();
        let t = Tensor::from_vec(x.clone(), (rows, cols), &dev).unwrap();
        let scaled = |elem, kind, dynamic| Scheme::Scaled { elem, kind, dynamic };
        for scheme in [
            scaled(NumBits::Int(8), AmaxKind::PerRow, false),
            scaled(NumBits::Int(8), AmaxKind::PerTensor, true),
            scaled(NumBits::Int(4), AmaxKind::PerBlock(128), false),
            scaled(NumBits::FP8_E4M3, AmaxKind::PerTensor, false),
            scaled(NumBits::FP8_E4M3, AmaxKind::PerRow, true),
            Scheme::Nvfp4 { block: 16, global_dynamic: true },
            Scheme::Mx { elem: NumBits::FP4_E2M1, block: 32 },
            Scheme::Mx { elem: NumBits::FP8_E4M3, block: 32 },
        ] {
            let q = Quantizer::new(scheme.clone(), Role::Weight, false, false);
            let want = q.fake_quant_weight(&x, rows, cols).unwrap();
            let got =
                fake_quant(&q, &t, RangeSource::FromTensor).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let same = got.iter().zip(&want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
            assert_eq!(same, want.len(), "{scheme:?}: {} of {} elements differ", want.len() - same, want.len());
        }
        for kind in [AmaxKind::PerTensor, AmaxKind::PerRow, AmaxKind::PerCol, AmaxKind::PerBlock(128)] {
            let (r, bad) = ranges(kind, &t).unwrap();
            assert!(!bad);
            assert_eq!(r, kind.reduce(&x, rows, cols).0, "{kind:?} ranges");
        }
    }
}
