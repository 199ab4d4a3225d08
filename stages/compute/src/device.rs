//! Where and in which precision the score stage computes: `autoquant.device`
//! (`auto | cpu | cuda | cuda:N`) and `autoquant.dtype` (`auto | f32 | bf16 | f16`, and
//! `f64` on the CPU),
//! resolved once at plan time so that the resolved pair goes into the stage's key.
//!
//! `auto` is the first GPU when this qpipe was built with the `cuda` feature and the
//! driver reports one, else the CPU. The dtype `auto` is bf16 on a GPU (what users score
//! real checkpoints in) and f32 on the CPU (what the ModelOpt parity fixtures use).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// A resolved compute target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compute {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16`, `f16` or (CPU) `f64`.
    pub dtype: String,
}

/// Number of CUDA devices this build can use (0 without the `cuda` feature or a driver).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// Resolves the two settings (errors name the key and the valid values).
pub fn resolve(device: &str, dtype: &str) -> Result<Compute> {
    resolve_with(device, dtype, cfg!(feature = "cuda"), cuda_device_count)
}

fn resolve_with(device: &str, dtype: &str, built_with_cuda: bool, count: impl Fn() -> usize) -> Result<Compute> {
    let device = match device {
        "cpu" => "cpu".to_string(),
        "auto" => {
            if built_with_cuda && count() > 0 {
                "cuda:0".into()
            } else {
                "cpu".into()
            }
        }
        d => {
            let ordinal = match d.strip_prefix("cuda") {
                Some("") => 0,
                Some(n) => n.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()).with_context(|| {
                    format!("key `autoquant.device`: unknown device `{d}`; valid: auto, cpu, cuda, cuda:N")
                })?,
                None => bail!("key `autoquant.device`: unknown device `{d}`; valid: auto, cpu, cuda, cuda:N"),
            };
            if !built_with_cuda {
                bail!(
                    "key `autoquant.device`: `{d}` asked for, but this qpipe was built without GPU support; rebuild \
                     with `cargo build --release --features cuda` (see the README's GPU section) or use `cpu`/`auto`"
                );
            }
            let n = count();
            if ordinal >= n {
                bail!("key `autoquant.device`: `{d}` asked for, but the CUDA driver reports {n} device(s)");
            }
            format!("cuda:{ordinal}")
        }
    };
    let dtype = match dtype {
        "auto" if device == "cpu" => "f32",
        "auto" => "bf16",
        "f32" | "bf16" | "f16" => dtype,
        "f64" if device == "cpu" => dtype,
        "f64" => bail!(
            "key `autoquant.dtype`: `f64` runs on the CPU only (a rounding-free reference for parity checks, \
             not for real-size scoring); set `autoquant.device=cpu` or use f32/bf16 on `{device}`"
        ),
        d => bail!("key `autoquant.dtype`: unknown dtype `{d}`; valid: auto, f32, bf16, f16, f64 (CPU only)"),
    };
    Ok(Compute { device, dtype: dtype.into() })
}

/// The candle device of a resolved `cpu` / `cuda:N`.
pub fn candle_device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal: usize = name
        .strip_prefix("cuda:")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("internal error: unresolved device `{name}`"))?;
    Device::new_cuda(ordinal).with_context(|| format!("opening {name}; check `nvidia-smi` and the CUDA driver"))
}

/// The candle dtype of a resolved `f32` / `bf16` / `f16` / `f64`.
pub fn candle_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "f64" => DType::F64,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("internal error: unresolved dtype `{other}`"),
    })
}

/// Memory free for the scorer on `device`: `MemAvailable` on the CPU, the driver's free
/// memory on a GPU; `None` when unknown.
pub fn available_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let m = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kib = m.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB");
            Some(kib.trim().parse::<u64>().ok()? * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok().map(|(free, _)| free as u64),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_resolve() {
        let r = |d: &str, t: &str, cuda: bool, n: usize| resolve_with(d, t, cuda, || n);
        let c = |d: &str, t: &str| Compute { device: d.into(), dtype: t.into() };
        assert_eq!(r("auto", "auto", false, 0).unwrap(), c("cpu", "f32"));
        assert_eq!(r("auto", "auto", true, 0).unwrap(), c("cpu", "f32"));
        assert_eq!(r("auto", "auto", true, 2).unwrap(), c("cuda:0", "bf16"));
        assert_eq!(r("cuda", "f32", true, 1).unwrap(), c("cuda:0", "f32"));
        assert_eq!(r("cuda:1", "auto", true, 2).unwrap(), c("cuda:1", "bf16"));
        assert_eq!(r("cpu", "bf16", true, 2).unwrap(), c("cpu", "bf16"));
        let e = r("cuda:0", "auto", false, 0).unwrap_err().to_string();
        assert!(e.contains("autoquant.device") && e.contains("--features cuda"), "{e}");
        assert!(r("cuda:3", "auto", true, 2).unwrap_err().to_string().contains("reports 2 device"));
        assert!(r("tpu", "auto", true, 2).unwrap_err().to_string().contains("valid: auto, cpu"));
        assert!(r("cuda:x", "auto", true, 2).is_err());
        assert!(r("cpu", "fp8", false, 0).unwrap_err().to_string().contains("autoquant.dtype"));
        assert_eq!(r("cpu", "f64", false, 0).unwrap(), c("cpu", "f64"));
        assert_eq!(r("auto", "f64", false, 0).unwrap(), c("cpu", "f64"));
        let e = r("auto", "f64", true, 1).unwrap_err().to_string();
        assert!(e.contains("autoquant.dtype") && e.contains("CPU only") && e.contains("cuda:0"), "{e}");
        assert_eq!(resolve("auto", "auto").unwrap().device, if cuda_device_count() > 0 { "cuda:0" } else { "cpu" });
    }

    #[test]
    fn candle_names() {
        assert!(candle_device("cpu").unwrap().is_cpu());
        assert!(candle_device("cuda").is_err());
        assert_eq!(candle_dtype("bf16").unwrap(), DType::BF16);
        assert!(available_bytes(&Device::Cpu).is_some_and(|b| b > 0));
    }
}
