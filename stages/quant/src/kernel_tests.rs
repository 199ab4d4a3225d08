//! The GPU fake-quant kernels (`kernels.cu`), run on the CPU and compared bit for bit with
//! the Rust quantizers.
//!
//! The kernels are written as "one thread per item, plain loops", so the very same file
//! compiles as C (`QPIPE_HOST`): a small driver runs each launch of a [`KernelPlan`] as a
//! loop over thread indices. Needs a C compiler (`cc`, which Rust's linker already is on
//! Linux); without one the tests say so loudly and pass. NVRTC compiles the file for the
//! GPU with `--fmad=false`; the C build uses `-ffp-contract=off`, so both round every
//! operation alone, as the Rust code does.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::kernels::{self, KernelPlan};
use crate::observer::{Amax, AmaxKind, AmaxObserver};
use crate::types::{NumBits, Quantizer, RangeSource, Role, Scheme};

const DRIVER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include "kernels.cu"
typedef void (*kfn)(const float*, float*, float*, unsigned int*, qp_args);
static float rd(void) { unsigned int u; if (scanf("%x", &u) != 1) exit(2); return qp_u2f(u); }
int main(void) {
    long long numel, rl; int up, nl;
    if (scanf("%lld %lld %d", &numel, &rl, &up) != 3) return 2;
    float *x = malloc(sizeof(float) * numel), *y = calloc(numel, sizeof(float)), *r = calloc(rl, sizeof(float));
    unsigned int bad = 0;
    for (long long i = 0; i < numel; i++) x[i] = rd();
    if (up) for (long long i = 0; i < rl; i++) r[i] = rd();
    if (scanf("%d", &nl) != 1) return 2;
    for (int l = 0; l < nl; l++) {
        char name[64]; qp_args a; unsigned int f0, f1;
        if (scanf("%63s %lld %lld %lld %lld %d %d %x %x", name, &a.count, &a.rows, &a.cols, &a.n, &a.kind,
                  &a.flag, &f0, &f1) != 9) return 2;
        a.f0 = qp_u2f(f0); a.f1 = qp_u2f(f1);
        kfn k = !strcmp(name, "qp_amax") ? qp_amax : !strcmp(name, "qp_amax_reduce") ? qp_amax_reduce
              : !strcmp(name, "qp_int") ? qp_int : !strcmp(name, "qp_fp8") ? qp_fp8
              : !strcmp(name, "qp_nvfp4") ? qp_nvfp4 : !strcmp(name, "qp_mx") ? qp_mx : 0;
        if (!k) return 3;
        for (qp_tid = 0; qp_tid < a.count; qp_tid++) k(x, y, r, &bad, a);
    }
    printf("%u\n", bad);
    for (long long i = 0; i < numel; i++) printf("%08x\n", qp_f2u(y[i]));
    for (long long i = 0; i < rl; i++) printf("%08x\n", qp_f2u(r[i]));
    return 0;
}
"#;

/// The kernels compiled for the host, once per test process; `None` (said loudly) without
/// a C compiler.
fn emulator() -> Option<&'static PathBuf> {
    static EXE: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("kernels.cu"), kernels::SOURCE).unwrap();
        std::fs::write(dir.path().join("driver.c"), DRIVER).unwrap();
        let exe = dir.path().join("emu");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let out = Command::new(&cc)
            .args(["-std=c11", "-O2", "-ffp-contract=off", "-fno-fast-math", "-DQPIPE_HOST", "-o"])
            .arg(&exe)
            .arg(dir.path().join("driver.c"))
            .arg("-lm")
            .output();
        match out {
            Ok(o) if o.status.success() => Some((dir, exe)),
            Ok(o) => panic!("compiling kernels.cu as C failed:\n{}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => {
                eprintln!("SKIPPED: no C compiler (`{cc}`: {e}); the GPU kernels' CPU emulation did not run");
                None
            }
        }
    })
    .as_ref()
    .map(|(_, exe)| exe)
}

/// Runs `plan` on `x` in the emulator: the NaN flag, `y` and the ranges buffer.
fn emulate(exe: &PathBuf, plan: &KernelPlan, x: &[f32]) -> Result<(u32, Vec<f32>, Vec<f32>)> {
    let mut input = format!("{} {} {}\n", x.len(), plan.ranges_len, u8::from(plan.upload.is_some()));
    for v in x.iter().chain(plan.upload.iter().flatten()) {
        input += &format!("{:08x}\n", v.to_bits());
    }
    input += &format!("{}\n", plan.launches.len());
    for l in &plan.launches {
        let a = &l.args;
        let (f0, f1) = (a.f0.to_bits(), a.f1.to_bits());
        input += &format!(
            "{} {} {} {} {} {} {} {f0:08x} {f1:08x}\n",
            l.kernel, a.count, a.rows, a.cols, a.n, a.kind, a.flag
        );
    }
    let mut child = Command::new(exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("emulator exited with {}", out.status);
    }
    let text = String::from_utf8(out.stdout)?;
    let mut words = text.split_whitespace();
    let bad: u32 = words.next().context("no output")?.parse()?;
    let mut floats = words.map(|w| Ok(f32::from_bits(u32::from_str_radix(w, 16)?))).collect::<Result<Vec<f32>>>()?;
    let ranges = floats.split_off(x.len());
    Ok((bad, floats, ranges))
}

/// `y` of `plan` on `x`, or the error the CUDA executor gives.
fn run(exe: &PathBuf, plan: &KernelPlan, x: &[f32]) -> Result<Vec<f32>> {
    let (bad, y, _) = emulate(exe, plan, x)?;
    if plan.computes_ranges && bad != 0 {
        bail!("tensor contains NaN or infinite values");
    }
    Ok(y)
}

/// Deterministic test data: Gaussian-like values with outliers, exact ties on the integer
/// grids, an all-zero row and tiny values.
fn data(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let u = next();
            match (r, c % 17) {
                (1, _) => 0.0,
                (_, 3) => (u * 8.0).round() + 0.5, // ties
                (_, 5) => u * 1e-9,
                (_, 7) => u * 40.0,
                _ => (u + next() + next()) * 0.7,
            }
        })
        .collect()
}

fn quantizer(scheme: Scheme, narrow: bool) -> Quantizer {
    Quantizer::new(scheme, Role::Input, narrow, false)
}

fn assert_bits(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{name}: element {i}: kernel {g}, Rust {w}");
    }
}

#[test]
fn kernels_equal_the_rust_quantizers_bit_for_bit() {
    let Some(exe) = emulator() else { return };
    let (rows, cols) = (6, 256 + 44); // a ragged last block for blocks of 128 and 32
    let x = data(rows, cols, 7);
    let scaled = |elem, kind, dynamic| Scheme::Scaled { elem, kind, dynamic };
    let cases: Vec<(&str, Quantizer)> = vec![
        ("int8 per tensor", quantizer(scaled(NumBits::Int(8), AmaxKind::PerTensor, false), false)),
        ("int8 per row", quantizer(scaled(NumBits::Int(8), AmaxKind::PerRow, false), false)),
        ("int8 per column", quantizer(scaled(NumBits::Int(8), AmaxKind::PerCol, false), false)),
        ("int8 narrow", quantizer(scaled(NumBits::Int(8), AmaxKind::PerTensor, false), true)),
        ("int8 per token", quantizer(scaled(NumBits::Int(8), AmaxKind::PerRow, true), false)),
        ("int4 blocks of 128", quantizer(scaled(NumBits::Int(4), AmaxKind::PerBlock(128), false), false)),
        ("fp8 per tensor", quantizer(scaled(NumBits::FP8_E4M3, AmaxKind::PerTensor, false), false)),
        ("fp8 per token", quantizer(scaled(NumBits::FP8_E4M3, AmaxKind::PerRow, true), false)),
        ("fp8 per column", quantizer(scaled(NumBits::FP8_E4M3, AmaxKind::PerCol, false), false)),
        ("nvfp4 static", quantizer(Scheme::Nvfp4 { block: 16, global_dynamic: false }, false)),
        ("nvfp4 dynamic", quantizer(Scheme::Nvfp4 { block: 16, global_dynamic: true }, false)),
        ("mxfp4", quantizer(Scheme::Mx { elem: NumBits::FP4_E2M1, block: 32 }, false)),
        ("mxfp8", quantizer(Scheme::Mx { elem: NumBits::FP8_E4M3, block: 32 }, false)),
    ];
    for (name, q) in &cases {
        // As a weight: ranges from the tensor itself.
        let want = q.fake_quant_weight(&x, rows, cols).unwrap();
        let plan = kernels::plan(q, rows, cols, RangeSource::FromTensor).unwrap().unwrap();
        assert_bits(&format!("{name} (weight)"), &run(exe, &plan, &x).unwrap(), &want);
        // As an input: calibrated on another batch (values beyond its range get clamped).
        let amax = q.observer().map(|mut o| {
            o.observe(&data(rows, cols, 11).iter().map(|v| v * 0.5).collect::<Vec<_>>(), rows, cols).unwrap();
            o.amax().unwrap()
        });
        let want = q.fake_quant(&x, rows, cols, amax.as_ref()).unwrap();
        let plan = kernels::plan(q, rows, cols, RangeSource::Calibrated(amax.as_ref())).unwrap().unwrap();
        assert_bits(&format!("{name} (input)"), &run(exe, &plan, &x).unwrap(), &want);
    }
}

#[test]
fn kernels_compute_the_observer_ranges() {
    let Some(exe) = emulator() else { return };
    let (rows, cols) = (5, 9000); // the whole-tensor reduction takes three chunks
    let x = data(rows, cols, 3);
    for kind in [AmaxKind::PerTensor, AmaxKind::PerRow, AmaxKind::PerCol, AmaxKind::PerBlock(128)] {
        let (bad, _, ranges) = emulate(exe, &kernels::range_plan(kind, rows, cols), &x).unwrap();
        assert_eq!(bad, 0);
        let mut o = AmaxObserver::new(kind);
        o.observe(&x, rows, cols).unwrap();
        assert_bits(&format!("{kind:?} ranges"), &ranges[..kind.len(rows, cols)], &o.amax().unwrap().values);
    }
}

#[test]
fn kernels_report_nan_in_dynamic_ranges_like_the_rust_quantizers() {
    let Some(exe) = emulator() else { return };
    let mut x = data(4, 64, 5);
    x[77] = f32::NAN;
    let q = quantizer(Scheme::Scaled { elem: NumBits::Int(8), kind: AmaxKind::PerRow, dynamic: true }, false);
    assert!(q.fake_quant(&x, 4, 64, None).is_err());
    let plan = kernels::plan(&q, 4, 64, RangeSource::Calibrated(None)).unwrap().unwrap();
    assert!(run(exe, &plan, &x).unwrap_err().to_string().contains("NaN"));
    // Static ranges do not look at the data: NaN passes through, as in Rust.
    let q = quantizer(Scheme::Scaled { elem: NumBits::Int(8), kind: AmaxKind::PerTensor, dynamic: false }, false);
    let a = Amax::per_tensor(2.0);
    let want = q.fake_quant(&x, 4, 64, Some(&a)).unwrap();
    let plan = kernels::plan(&q, 4, 64, RangeSource::Calibrated(Some(&a))).unwrap().unwrap();
    let got = run(exe, &plan, &x).unwrap();
    assert!(got[77].is_nan() && want[77].is_nan());
    assert_bits("int8 static with NaN", &[&got[..77], &got[78..]].concat(), &[&want[..77], &want[78..]].concat());
}

#[test]
fn kernels_round_ties_to_even_as_the_rust_quantizers() {
    let Some(exe) = emulator() else { return };
    // Calibrated ranges chosen so that the scale is exactly 1: every value below sits
    // exactly between two grid points (integer halves; midpoints of the E4M3 grid,
    // subnormals included).
    let halves: Vec<f32> = (-140..140).map(|k| k as f32 + 0.5).collect();
    let mut e4m3 = vec![];
    for bits in 0u32..0x7e {
        let (e, m) = ((bits >> 3) as i32, (bits & 7) as f32);
        let v = |e: i32, m: f32| if e == 0 { m * 2f32.powi(-9) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
        let (a, b) = (v(e, m), v(((bits + 1) >> 3) as i32, ((bits + 1) & 7) as f32));
        e4m3.extend([(a + b) / 2.0, -(a + b) / 2.0]);
    }
    let scaled = |elem, kind| Scheme::Scaled { elem, kind, dynamic: false };
    let cases = [
        ("int8", quantizer(scaled(NumBits::Int(8), AmaxKind::PerTensor), false), 127.0, &halves),
        ("int4", quantizer(scaled(NumBits::Int(4), AmaxKind::PerTensor), false), 7.0, &halves),
        ("fp8", quantizer(scaled(NumBits::FP8_E4M3, AmaxKind::PerTensor), false), 448.0, &e4m3),
    ];
    for (name, q, amax, x) in cases {
        let a = Amax::per_tensor(amax);
        let want = q.fake_quant(x, 1, x.len(), Some(&a)).unwrap();
        let plan = kernels::plan(&q, 1, x.len(), RangeSource::Calibrated(Some(&a))).unwrap().unwrap();
        assert_bits(&format!("{name} ties"), &run(exe, &plan, x).unwrap(), &want);
    }
}
