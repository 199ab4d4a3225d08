//! Cross-module tests of the quant formats: ModelOpt's own vectors (INT, FP8), an
//! independent reference for FP4 (NVFP4, MXFP4), hand-computed kernels, and the
//! pipeline.yaml grid of pairs × granularity overlays.

use serde_json::{json, Map, Value};

use super::*;

fn unhex(s: &str) -> Vec<f32> {
    assert_eq!(s.len() % 8, 0, "hex tensor length {}", s.len());
    (0..s.len() / 8)
        .map(|i| {
            let b: Vec<u8> =
                (0..4).map(|j| u8::from_str_radix(&s[i * 8 + 2 * j..i * 8 + 2 * j + 2], 16).unwrap()).collect();
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        })
        .collect()
}

/// Distance in units in the last place between two finite f32 (0 for +0 vs -0).
fn ulps(a: f32, b: f32) -> u64 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        i64::from(if i < 0 { i32::MIN - i } else { i })
    };
    key(a).abs_diff(key(b))
}

/// ModelOpt 0.47's TensorQuantizer on the CPU (scripts/modelopt_quant_vectors.py) against
/// qpipe, every element bit for bit (signed zeros included), calibrated amax too.
#[test]
fn modelopt_vectors_match_bit_exactly() {
    let doc: Value =
        serde_json::from_str(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/quant_modelopt.json")))
            .unwrap();
    let tensors = doc["tensors"].as_object().unwrap();
    let tensor = |name: &str| {
        let t = &tensors[name];
        (unhex(t["data"].as_str().unwrap()), t["rows"].as_u64().unwrap() as usize)
    };
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 15, "fixture has {} cases", cases.len());
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let role = if case["role"] == "weight" { Role::Weight } else { Role::Input };
        let spec = QuantizerSpec::from_attributes(case["quantizer"].as_object().unwrap()).unwrap();
        let q = Quantizer::new(spec.scheme(role).unwrap(), role, spec.narrow_range, spec.unsigned);
        let (rows, cols) = (case["rows"].as_u64().unwrap() as usize, case["cols"].as_u64().unwrap() as usize);
        let (x, _) = tensor(case["x"].as_str().unwrap());
        let amax = match (role, case["calib"].as_array()) {
            (Role::Weight, _) => q.calibrate_weight(&x, rows, cols).unwrap(),
            (Role::Input, Some(batches)) => {
                let mut obs = q.observer().expect("a static quantizer");
                for b in batches {
                    let (data, r) = tensor(b.as_str().unwrap());
                    obs.observe(&data, r, cols).unwrap();
                }
                obs.amax()
            }
            (Role::Input, None) => {
                assert!(!q.needs_calibration(), "{name}");
                None
            }
        };
        if let Some(want) = case["amax"].as_str() {
            let want = unhex(want);
            let got = &amax.as_ref().unwrap_or_else(|| panic!("{name}: no amax")).values;
            assert_eq!(got.len(), want.len(), "{name}: amax count");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{name}: amax[{i}] {g} vs ModelOpt {w}");
            }
        }
        let y = q.fake_quant(&x, rows, cols, amax.as_ref()).unwrap();
        let want = unhex(case["y"].as_str().unwrap());
        assert_eq!(y.len(), want.len());
        let mut worst = 0;
        for (i, (g, w)) in y.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name}: element {i} (row {}, col {}) x = {:e}: qpipe {g:e} vs ModelOpt {w:e}",
                i / cols,
                i % cols,
                x[i]
            );
            worst = worst.max(ulps(*g, *w));
        }
        report.push(format!("{name}: {} elements, worst {worst} ulp", y.len()));
    }
    eprintln!("ModelOpt vectors:\n  {}", report.join("\n  "));
}

// ---- An independent, deliberately simple FP4 reference (no shared code with fake.rs) ----

/// All non-negative finite E4M3 values, ascending, from their bit fields.
fn e4m3_values() -> Vec<f32> {
    (0u32..=0x7e)
        .map(|bits| {
            let (e, m) = ((bits >> 3) as i32, (bits & 7) as f32);
            if e == 0 {
                m / 8.0 * 2f32.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f32.powi(e - 7)
            }
        })
        .collect()
}

/// Nearest of an ascending grid by exhaustive search; ties go to the even index (the
/// value whose last mantissa bit is 0); beyond the top → the top (saturation).
fn nearest(grid: &[f32], a: f32) -> f32 {
    let mut best = 0;
    for i in 1..grid.len() {
        let (d_best, d_i) = ((f64::from(a) - f64::from(grid[best])).abs(), (f64::from(a) - f64::from(grid[i])).abs());
        if d_i < d_best || (d_i == d_best && i % 2 == 0) {
            best = i;
        }
    }
    grid[best]
}

const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

fn ref_nvfp4(x: &[f32], cols: usize, block: usize, global_amax: f32) -> Vec<f32> {
    let e4 = e4m3_values();
    let mut gs = global_amax * (1.0 / 2688.0);
    if gs <= 0.0 {
        gs = 1e-12;
    }
    let mut y = vec![0.0; x.len()];
    for start in (0..x.len()).step_by(cols) {
        let mut b0 = start;
        while b0 < start + cols {
            let b1 = (b0 + block).min(start + cols);
            let mut amax = 0.0f32;
            for v in &x[b0..b1] {
                if v.abs() > amax {
                    amax = v.abs();
                }
            }
            let mut s = amax / (6.0 * gs);
            if s > 448.0 {
                s = 448.0;
            }
            let mut scale = nearest(&e4, s) * gs;
            if scale < 1e-5 {
                scale = 1.0;
            }
            for i in b0..b1 {
                let q = nearest(&E2M1, x[i].abs() / scale) * scale;
                y[i] = if x[i] < 0.0 { -q } else { q };
            }
            b0 = b1;
        }
    }
    y
}

fn ref_mxfp4(x: &[f32], cols: usize, block: usize) -> Vec<f32> {
    ref_mx(x, cols, block, &E2M1)
}

/// MX with any element grid (ascending, non-negative, its top = the element max).
fn ref_mx(x: &[f32], cols: usize, block: usize, grid: &[f32]) -> Vec<f32> {
    let elem_max = grid[grid.len() - 1];
    let mut y = vec![0.0; x.len()];
    for start in (0..x.len()).step_by(cols) {
        let mut b0 = start;
        while b0 < start + cols {
            let b1 = (b0 + block).min(start + cols);
            let amax = x[b0..b1].iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            // Smallest power of two 2^e with 2^e >= amax / elem_max (in f32), e in [-127, 127].
            let ratio = amax / elem_max;
            let mut e = -127i32;
            while e < 127 && f64::from(ratio) > 2f64.powi(e) {
                e += 1;
            }
            let (scale, unscale) = if amax == 0.0 { (1.0, 1.0) } else { (2f64.powi(-e) as f32, 2f64.powi(e) as f32) };
            for i in b0..b1 {
                let q = nearest(grid, x[i].abs() * scale) * unscale;
                y[i] = if x[i] < 0.0 { -q } else { q };
            }
            b0 = b1;
        }
    }
    y
}

/// A deterministic pseudo-random tensor with a spread of magnitudes, zeros, negative
/// zeros, exact E2M1 ties and a zero block.
fn fp4_test_tensor(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut x: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let r = next();
            let u = (r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            let mag = 2f64.powi(((r >> 3) % 24) as i32 - 14);
            (u * mag) as f32
        })
        .collect();
    for (i, v) in x.iter_mut().enumerate() {
        match i % 29 {
            0 => *v = 0.0,
            1 => *v = -0.0,
            _ => {}
        }
    }
    // A block of exact E2M1 ties under scale 1 (amax 6): 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.
    let ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0];
    x[..16].copy_from_slice(&ties);
    if cols >= 64 {
        x[cols + 32..cols + 64].iter_mut().for_each(|v| *v = 0.0);
    }
    x
}

fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: production {g:e} vs reference {w:e}");
    }
}

#[test]
fn nvfp4_matches_the_independent_reference() {
    for (rows, cols, block, seed) in [(6, 64, 16, 1), (5, 96, 32, 2), (3, 80, 64, 3), (4, 40, 16, 4)] {
        let x = fp4_test_tensor(rows, cols, seed);
        let global = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let q = Quantizer::new(Scheme::Nvfp4 { block, global_dynamic: false }, Role::Weight, false, false);
        let y = q.fake_quant(&x, rows, cols, Some(&Amax::per_tensor(global))).unwrap();
        assert_bits_eq(&y, &ref_nvfp4(&x, cols, block, global), &format!("nvfp4 [{rows}, {cols}] / {block}"));
        // A calibrated global amax larger than the tensor's (static input ranges).
        let y = q.fake_quant(&x, rows, cols, Some(&Amax::per_tensor(global * 37.0))).unwrap();
        assert_bits_eq(&y, &ref_nvfp4(&x, cols, block, global * 37.0), "nvfp4, larger global amax");
        // Dynamic global amax = the tensor's own.
        let qd = Quantizer::new(Scheme::Nvfp4 { block, global_dynamic: true }, Role::Input, false, false);
        assert_bits_eq(&qd.fake_quant(&x, rows, cols, None).unwrap(), &ref_nvfp4(&x, cols, block, global), "dynamic");
    }
}

#[test]
fn mxfp4_matches_the_independent_reference() {
    for (rows, cols, block, seed) in [(6, 64, 32, 5), (4, 96, 32, 6), (3, 48, 16, 7), (2, 40, 32, 8)] {
        let mut x = fp4_test_tensor(rows, cols, seed);
        x[cols - 1] = 3.0e-39; // a subnormal-only block tail
        let q = Quantizer::new(Scheme::Mx { elem: NumBits::FP4_E2M1, block }, Role::Weight, false, false);
        let y = q.fake_quant(&x, rows, cols, None).unwrap();
        assert_bits_eq(&y, &ref_mxfp4(&x, cols, block), &format!("mxfp4 [{rows}, {cols}] / {block}"));
    }
}

#[test]
fn mxfp8_matches_the_independent_reference() {
    let grid = e4m3_values();
    for (rows, cols, seed) in [(4, 64, 9), (3, 96, 10)] {
        let x = fp4_test_tensor(rows, cols, seed);
        let q = Quantizer::new(Scheme::Mx { elem: NumBits::FP8_E4M3, block: 32 }, Role::Weight, false, false);
        let y = q.fake_quant(&x, rows, cols, None).unwrap();
        assert_bits_eq(&y, &ref_mx(&x, cols, 32, &grid), "mxfp8");
    }
}

#[test]
fn nvfp4_hand_computed_block() {
    // Global amax 6·448 = 2688 → global scale 1. Block amax 12 → scale e4m3(12/6) = 2.
    let x = [12.0, 0.5, 0.4, 0.6, -1.5, 2.5, 3.0, -5.0, 7.0, 9.0, 11.0, 4.5, -0.0, 1.0, 1.5, 0.0];
    let want = [12.0, 0.0, 0.0, 1.0, -2.0, 2.0, 3.0, -4.0, 8.0, 8.0, 12.0, 4.0, 0.0, 1.0, 2.0, 0.0];
    let q = Quantizer::new(Scheme::Nvfp4 { block: 16, global_dynamic: false }, Role::Weight, false, false);
    let y = q.fake_quant(&x, 1, 16, Some(&Amax::per_tensor(2688.0))).unwrap();
    assert_eq!(y, want);
    // Block amax 0.7 → 0.7/6 = 0.11667 → E4M3 0.1171875 (binade [2^-4, 2^-3), quantum 2^-7).
    let s = 0.1171875f32;
    let x2 = [0.7f32, 0.35, -0.06, 0.0];
    let y2 = q.fake_quant(&x2, 1, 4, Some(&Amax::per_tensor(2688.0))).unwrap();
    let want2 = [6.0 * s, 3.0 * s, -0.5 * s, 0.0]; // 0.7/s = 5.97→6, 0.35/s = 2.99→3, 0.06/s = 0.512→0.5
    assert_eq!(y2, want2);
    // Tiny block: scale rounds below 1e-5 → scale 1, values round to 0.
    let y3 = q.fake_quant(&[1e-6, -2e-6], 1, 2, Some(&Amax::per_tensor(2688.0))).unwrap();
    assert_eq!(y3, [0.0, -0.0]);
    assert!(y3[1].is_sign_negative());
}

#[test]
fn mxfp4_hand_computed_block() {
    // amax 12 → 12/6 = 2 = 2^1 exactly → e = 1, scale 2^-1: E2M1(|x|/2)·2.
    // 1.0→0.5→1; 1.4→0.7→0.5→1; 2.6→1.3→1.5→3; 5→2.5 (tie)→2→4; 0.4→0.2→0; 7.1→3.55→4→8.
    let x = [12.0, 1.0, 1.4, -2.6, 5.0, 0.4, -0.0, 7.1];
    let want = [12.0, 1.0, 1.0, -3.0, 4.0, 0.0, 0.0, 8.0];
    let q = Quantizer::new(Scheme::Mx { elem: NumBits::FP4_E2M1, block: 8 }, Role::Weight, false, false);
    assert_eq!(q.fake_quant(&x, 1, 8, None).unwrap(), want);
    // amax 13 → 13/6 = 2.1667 → e = 2, scale 1/4: 13/4 = 3.25 → 3 → 12.
    let y = q.fake_quant(&[13.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -9.0], 1, 8, None).unwrap();
    assert_eq!(y, [12.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -8.0]);
    // An all-zero block stays zero (scale 1).
    assert_eq!(q.fake_quant(&[0.0; 8], 1, 8, None).unwrap(), [0.0; 8]);
}

#[test]
fn int_and_fp8_hand_computed() {
    // INT8 per tensor, amax 127 → scale 1: ties to even, clamp to [-128, 127] (narrow_range off).
    let q = Quantizer::new(
        Scheme::Scaled { elem: NumBits::Int(8), kind: AmaxKind::PerTensor, dynamic: false },
        Role::Input,
        false,
        false,
    );
    let x = [0.5, 1.5, 2.5, -0.5, -2.5, 200.0, -200.0, -127.6, -0.0];
    let y = q.fake_quant(&x, 1, 9, Some(&Amax::per_tensor(127.0))).unwrap();
    assert_eq!(y, [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -128.0, -128.0, -0.0]);
    // Narrow range clamps to -127.
    let qn = Quantizer::new(q.scheme().clone(), Role::Input, true, false);
    assert_eq!(qn.fake_quant(&[-200.0], 1, 1, Some(&Amax::per_tensor(127.0))).unwrap(), [-127.0]);
    // Zero (≤ 2^-24) amax → zeros.
    assert_eq!(q.fake_quant(&[0.3, -5.0], 1, 2, Some(&Amax::per_tensor(5e-8))).unwrap(), [0.0, -0.0]);
    // INT4 per token, dynamic: row amax 7 → scale 1.
    let q4 = Quantizer::new(
        Scheme::Scaled { elem: NumBits::Int(4), kind: AmaxKind::PerRow, dynamic: true },
        Role::Input,
        false,
        false,
    );
    let y = q4.fake_quant(&[7.0, 3.5, -4.5, 0.2, 14.0, 1.0, 3.0, -14.0], 2, 4, None).unwrap();
    assert_eq!(y, [7.0, 4.0, -4.0, 0.0, 14.0, 0.0, 4.0, -14.0]);
    // FP8 per tensor, amax 448 → scale 1: RNE to E4M3, saturation, subnormals.
    let f = Quantizer::new(
        Scheme::Scaled { elem: NumBits::FP8_E4M3, kind: AmaxKind::PerTensor, dynamic: false },
        Role::Input,
        false,
        false,
    );
    let y = f
        .fake_quant(&[1.0625, 1.1875, 500.0, -1000.0, 0.0029296875, -0.0], 1, 6, Some(&Amax::per_tensor(448.0)))
        .unwrap();
    assert_eq!(y, [1.0, 1.25, 448.0, -448.0, 0.00390625, -0.0]);
    // Zero amax → amax 1 (scale 448): 0.5 stays 0.5.
    assert_eq!(f.fake_quant(&[0.5], 1, 1, Some(&Amax::per_tensor(0.0))).unwrap(), [224.0f32 * (1.0f32 / 448.0)]);
}

#[test]
fn missing_or_misshaped_ranges_are_errors() {
    let c = config_for("INT8_DEFAULT_CFG", &Map::new()).unwrap();
    let iq = c.input_quantizer();
    let err = iq.fake_quant(&[1.0; 4], 2, 2, None).unwrap_err().to_string();
    assert!(err.contains("calibrat"), "{err}");
    let err =
        iq.fake_quant(&[1.0; 4], 2, 2, Some(&Amax { kind: AmaxKind::PerCol, values: vec![1.0, 1.0] })).unwrap_err();
    assert!(err.to_string().contains("PerTensor"), "{err}");
    let err = c.weight_quantizer().fake_quant_weight(&[1.0, f32::NAN], 1, 2).unwrap_err();
    assert!(format!("{err:#}").contains("NaN"), "{err:#}");
}

#[test]
fn candle_tensor_round_trip() {
    use candle_core::{Device, Tensor};
    let c = config_for("FP8_DEFAULT_CFG", &Map::new()).unwrap();
    let wq = c.weight_quantizer();
    let data: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) * 0.37).collect();
    let t = Tensor::from_vec(data.clone(), (2, 3, 4), &Device::Cpu).unwrap();
    let amax = wq.calibrate_weight(&data, 6, 4).unwrap();
    let y = wq.fake_quant_tensor(&t, amax.as_ref()).unwrap();
    assert_eq!(y.dims(), &[2, 3, 4]);
    let want = wq.fake_quant(&data, 6, 4, amax.as_ref()).unwrap();
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    let w = Tensor::from_vec(data.clone(), (6, 4), &Device::Cpu).unwrap().to_dtype(candle_core::DType::BF16).unwrap();
    let wq_t = wq.fake_quant_weight_tensor(&w).unwrap();
    let w32 = w.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(wq_t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), wq.fake_quant_weight(&w32, 6, 4).unwrap());
}

/// Every `format_name` of pipeline.yaml × every granularity overlay: each either builds
/// and fits the embedded model's Linear shapes, or fails naming the format, the overlay
/// key and a reason. The only failures are FP4 weights asked for an `axis`.
#[test]
fn pipeline_grid_builds_or_fails_with_a_reason() {
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipeline.yaml"))).unwrap();
    let doc: Value = serde_json::to_value(&yaml).unwrap();
    let pairs = doc["groups"]["quant_pair"].as_object().unwrap();
    let grans = doc["groups"]["quant_granularity"].as_object().unwrap();
    assert_eq!(pairs.len(), 16);
    assert_eq!(grans.len(), 9);
    // The embedded tiny Qwen3-VL: hidden 128, intermediate 384, 4 heads × 32, 2 KV heads.
    let linears = [(128, 128), (64, 128), (384, 128), (128, 384)];
    let (mut built, mut failed) = (0, Vec::new());
    for (pair, p) in pairs {
        let format = p["format_name"].as_str().unwrap();
        for (gname, g) in grans {
            let ov = g["quant_cfg_overrides"].as_object().cloned().unwrap_or_default();
            let fp4_axis = p["weight"] == "fp4" && ov.get("*weight_quantizer").is_some_and(|w| w.get("axis").is_some());
            let shapes: Vec<(usize, usize)> = linears.iter().map(|&(o, i)| (i, o)).collect();
            match check_combination(pair, gname, format, &ov, &shapes) {
                Ok(c) => {
                    assert!(!fp4_axis, "{pair} × {gname} should have been rejected");
                    let bits = c.effective_bits();
                    assert!(bits > 0.0 && bits <= 8.0, "{pair} × {gname}: {bits} bits");
                    assert!(c.display_name().ends_with(&format!("(effective-bits: {bits:?})")));
                    built += 1;
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(fp4_axis, "{pair} × {gname} failed: {e}");
                    assert!(e.contains(format) && e.contains("*weight_quantizer") && e.contains("E2M1"), "{e}");
                    assert!(e.contains(pair.as_str()) && e.contains(gname.as_str()), "{e}");
                    failed.push(format!("{pair} × {gname}"));
                }
            }
        }
    }
    eprintln!("grid: {built} built, {} rejected: {}", failed.len(), failed.join(", "));
    assert_eq!(built + failed.len(), 144);
    assert_eq!(failed.len(), 16);
    // A group size that does not divide a Linear's input dimension is rejected with both.
    let ov = serde_json::from_value(json!({"*weight_quantizer": {"block_sizes": {"-1": 128}}})).unwrap();
    let e = check_combination(
        "wint8_aint8",
        "w_group128",
        "INT8_DEFAULT_CFG",
        &ov,
        &[(4096, 2560), (2560, 9728), (200, 8)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("wint8_aint8") && e.contains("w_group128") && e.contains("in_features = 200"), "{e}");
}

/// Prints the table of formats (effective bits, display name) for the docs and reports.
#[test]
fn format_table() {
    let mut rows = Vec::new();
    for name in known_formats() {
        let c = config_for(name, &Map::new()).unwrap();
        rows.push(format!("| {name} | {:?} | {:?} | {} |", c.weight_scheme, c.input_scheme, c.display_name()));
        assert_eq!(c.effective_bits(), c.weight.effective_bits().min(c.input.effective_bits()));
    }
    eprintln!("{}", rows.join("\n"));
}

/// Gaussian-ish deterministic data (sum of uniforms), `n` values, std ≈ 1.
fn gaussianish(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.max(1);
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n).map(|_| ((0..12).map(|_| u()).sum::<f64>() - 6.0) as f32).collect()
}

/// Quantization error bounds of every format on random data: |Q(x) − x| relative to the
/// range of the group that scaled x. Prints the worst case per format (for the docs).
#[test]
fn quantization_error_is_within_each_formats_step() {
    let (rows, cols) = (64, 256);
    let x = gaussianish(rows * cols, 42);
    let mut table = Vec::new();
    // (format, role, bound on |err| / group amax)
    let cases = [
        ("INT8_DEFAULT_CFG", Role::Weight, 0.5 / 127.0),
        ("INT8_DEFAULT_CFG", Role::Input, 0.5 / 127.0),
        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", Role::Weight, 0.5 / 7.0),
        ("INT8_WEIGHT_INT4_ACT_CFG", Role::Input, 0.5 / 7.0),
        ("FP8_DEFAULT_CFG", Role::Weight, 1.0 / 16.0),
        ("NVFP4_DEFAULT_CFG", Role::Weight, 0.25),
        ("W4A8_NVFP4_FP8_CFG", Role::Weight, 0.25),
        ("MXFP4_DEFAULT_CFG", Role::Weight, 1.0 / 3.0),
    ];
    for (fmt, role, bound) in cases {
        let c = config_for(fmt, &Map::new()).unwrap();
        let q = if role == Role::Weight { c.weight_quantizer() } else { c.input_quantizer() };
        let amax = q.observer().map(|mut o| {
            o.observe(&x, rows, cols).unwrap();
            o.amax().unwrap()
        });
        let y = q.fake_quant(&x, rows, cols, amax.as_ref()).unwrap();
        // The range each element was scaled by: its block (if any) else the tensor's.
        let block = q.scheme().block_size().unwrap_or(cols);
        let mut worst = 0.0f64;
        for r in 0..rows {
            for b in (0..cols).step_by(block) {
                let xb = &x[r * cols + b..r * cols + b + block];
                let yb = &y[r * cols + b..r * cols + b + block];
                let group_amax = match q.scheme() {
                    Scheme::Scaled { kind: AmaxKind::PerTensor, .. } => amax.as_ref().unwrap().values[0],
                    _ => xb.iter().fold(0.0f32, |m, v| m.max(v.abs())),
                };
                for (xv, yv) in xb.iter().zip(yb) {
                    worst = worst.max(f64::from((yv - xv).abs()) / f64::from(group_amax));
                }
            }
        }
        assert!(worst <= bound * (1.0 + 1e-5), "{fmt} {role:?}: worst |err|/amax {worst} > {bound}");
        assert!(worst > 0.0, "{fmt} {role:?}: no rounding at all?");
        table.push(format!("| {fmt} | {role:?} | {worst:.5} | {bound:.5} |"));
    }
    eprintln!("| format | quantizer | worst abs err / group amax | bound |\n{}", table.join("\n"));
}

/// Throughput of the fake quantizers (run with `--ignored --nocapture`).
#[test]
#[ignore = "timing, prints figures"]
fn fake_quant_throughput() {
    let (rows, cols) = (4096, 4096);
    let x = gaussianish(rows * cols, 7);
    for fmt in [
        "INT8_DEFAULT_CFG",
        "FP8_DEFAULT_CFG",
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
        "NVFP4_DEFAULT_CFG",
        "MXFP4_DEFAULT_CFG",
    ] {
        let q = config_for(fmt, &Map::new()).unwrap().weight_quantizer();
        let amax = q.calibrate_weight(&x, rows, cols).unwrap();
        let mut out = vec![0.0; x.len()];
        q.fake_quant_into(&x, rows, cols, amax.as_ref(), &mut out).unwrap();
        let reps = 5;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            q.fake_quant_into(&x, rows, cols, amax.as_ref(), &mut out).unwrap();
        }
        let dt = t.elapsed().as_secs_f64() / f64::from(reps);
        eprintln!(
            "{fmt}: [{rows}, {cols}] weight in {:.1} ms ({:.0} M elements/s)",
            dt * 1e3,
            (rows * cols) as f64 / dt / 1e6
        );
    }
}

/// `int_codes` are the integers behind `fake_quant`: `code / divisor` equals its output bit
/// for bit (sign of zero aside: a code has none), per tensor and per row, narrow range or
/// not, 4 and 8 bits, over ties, clamped values and zero ranges; other schemes have none.
#[test]
fn int_codes_are_the_integers_behind_fake_quant() {
    let (rows, cols) = (4, 301);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| match i % 7 {
            0 => (i % 255) as f32 - 127.5, // ties at scale 1
            1 => 1e6,
            2 => -1e6,
            _ => ((i * 37) % 1000) as f32 * 0.173 - 80.0,
        })
        .collect();
    for bits in [4u8, 8] {
        for narrow in [false, true] {
            for (kind, amax) in [
                (AmaxKind::PerTensor, Amax::per_tensor(127.0)),
                (AmaxKind::PerTensor, Amax::per_tensor(93.7)),
                (AmaxKind::PerRow, Amax { kind: AmaxKind::PerRow, values: vec![127.0, 3.3, 0.0, 1e-30] }),
            ] {
                let q = Quantizer::new(
                    Scheme::Scaled { elem: NumBits::Int(bits), kind, dynamic: false },
                    Role::Input,
                    narrow,
                    false,
                );
                let want = q.fake_quant(&x, rows, cols, Some(&amax)).unwrap();
                let c = q.int_codes(&x, rows, cols, Some(&amax)).unwrap().unwrap();
                assert_eq!(c.kind, kind);
                for (i, (&code, &w)) in c.codes.iter().zip(&want).enumerate() {
                    let d = c.divisors[if kind == AmaxKind::PerRow { i / cols } else { 0 }];
                    let got = f32::from(code) / d;
                    assert!(
                        got == w && (got != 0.0 || w == 0.0),
                        "{bits} bits {kind:?} narrow {narrow} [{i}]: {got} vs {w}"
                    );
                }
            }
        }
    }
    let mut nan = x.clone();
    nan[5] = f32::NAN;
    let q8 = Quantizer::new(
        Scheme::Scaled { elem: NumBits::Int(8), kind: AmaxKind::PerTensor, dynamic: false },
        Role::Input,
        false,
        false,
    );
    assert!(q8.int_codes(&nan, rows, cols, Some(&Amax::per_tensor(1.0))).is_err());
    let fp8 = Quantizer::new(
        Scheme::Scaled { elem: NumBits::FP8_E4M3, kind: AmaxKind::PerTensor, dynamic: false },
        Role::Input,
        false,
        false,
    );
    assert!(fp8.int_codes(&x, rows, cols, Some(&Amax::per_tensor(1.0))).unwrap().is_none());
}
