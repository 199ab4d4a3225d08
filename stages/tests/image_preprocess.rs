//! `io::image` against transformers' slow Qwen2-VL image processor (`Qwen2VLImageProcessorPil`,
//! transformers 5.25 / Pillow 13) on the synthetic images of `stages/tests/fixtures/images`, with
//! the two configs of `stages/tests/fixtures/image_configs` (fixture written by
//! `scripts/make_image_fixture.py`). Each step is checked alone: the decoded RGB pixels, the
//! resized uint8 image, then `image_grid_thw` and `pixel_values` (in full for small outputs, else
//! their sum, sum of squares and a strided sample). Run with `--nocapture` for the table of
//! differences.

use std::path::{Path, PathBuf};

use qpipe_stages::io::image::{self, ImageProcessorConfig, RgbImage};
use serde_json::Value;

/// Largest |ours - transformers'| allowed on `pixel_values` (measured: 0).
const TOLERANCE: f64 = 1e-6;

/// The fixture folder: `stages/tests/fixtures` under the repository root, the parent of this
/// crate's folder (override with `QPIPE_IMAGE_FIXTURES`).
fn fixtures() -> PathBuf {
    match std::env::var_os("QPIPE_IMAGE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("stages/tests/fixtures"),
    }
}

fn fnv1a64(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

/// The flat indices the fixture samples at (`i * len // 256`).
fn sample_indices(len: usize) -> Vec<usize> {
    if len <= 256 {
        (0..len).collect()
    } else {
        (0..256).map(|i| i * len / 256).collect()
    }
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| f64::from(x.as_f64().unwrap() as f32)).collect()
}

/// Checks an HWC uint8 image against a fixture summary; returns the largest difference on the
/// sampled bytes (the hash must match for 0).
fn check_u8(what: &str, img: &RgbImage, want: &Value) -> u8 {
    assert_eq!(usizes(&want["shape"]), [img.height, img.width, 3], "{what}: shape");
    let sampled = sample_indices(img.pixels.len());
    let max = sampled
        .iter()
        .zip(usizes(&want["sample_value"]))
        .map(|(&i, v)| img.pixels[i].abs_diff(v as u8))
        .max()
        .unwrap_or(0);
    let sum: u64 = img.pixels.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(
        (fnv1a64(&img.pixels), sum),
        (want["fnv1a64"].as_str().unwrap().to_string(), want["sum"].as_u64().unwrap()),
        "{what}: pixels differ from PIL's (largest difference on the sampled bytes: {max})"
    );
    max
}

/// Checks `pixel_values` against a fixture summary; returns the largest difference seen.
fn check_f32(what: &str, got: &[f32], want: &Value) -> f64 {
    let shape = usizes(&want["shape"]);
    assert_eq!(
        got.len(),
        shape.iter().product::<usize>(),
        "{what}: pixel_values has {} values, want {shape:?}",
        got.len()
    );
    let diff = |i: usize, w: f64| (f64::from(got[i]) - w).abs();
    let max = if let Some(values) = want.get("values") {
        floats(values).into_iter().enumerate().map(|(i, w)| diff(i, w)).fold(0.0, f64::max)
    } else {
        let samples = sample_indices(got.len()).into_iter().zip(floats(&want["sample_value"]));
        let max = samples.map(|(i, w)| diff(i, w)).fold(0.0, f64::max);
        let sum: f64 = got.iter().map(|&x| f64::from(x)).sum();
        let sum_sq: f64 = got.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let (want_sum, want_sq) = (want["sum"].as_f64().unwrap(), want["sum_sq"].as_f64().unwrap());
        // The sums differ by rounding order alone when the values are equal.
        assert!((sum - want_sum).abs() <= 1e-9 * want_sq.max(1.0), "{what}: sum {sum} vs {want_sum}");
        assert!((sum_sq - want_sq).abs() <= 1e-9 * want_sq.max(1.0), "{what}: sum of squares {sum_sq} vs {want_sq}");
        max
    };
    assert!(max <= TOLERANCE, "{what}: pixel_values differ from transformers' by up to {max:e}");
    max
}

#[test]
fn image_preprocess_matches_transformers_slow_processor() {
    let dir = fixtures();
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("image_preprocess.json")).unwrap()).unwrap();
    let configs: Vec<(String, ImageProcessorConfig)> = fixture["configs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, path)| (name.clone(), ImageProcessorConfig::from_file(&dir.join(path.as_str().unwrap())).unwrap()))
        .collect();
    let images = fixture["images"].as_array().unwrap();
    assert!(images.len() >= 8, "the fixture should have the 8 images the generator makes");

    println!(
        "{:<34} {:<8} {:>12} {:>10} {:>10} {:>14}",
        "image", "config", "grid_thw", "decode", "resize", "pixel_values"
    );
    for entry in images {
        let file = entry["file"].as_str().unwrap();
        let img = image::decode(&dir.join(file)).unwrap();
        let decode_max = check_u8(&format!("{file}: decoded"), &img, &entry["decoded_rgb"]);
        for (name, cfg) in &configs {
            let want = &entry["configs"][name];
            let what = format!("{file} [{name}]");
            let resized = image::resized(&img, cfg).unwrap();
            let resize_max = check_u8(&format!("{what}: resized"), &resized, &want["resized_u8"]);
            let out = image::preprocess(&img, cfg).unwrap();
            assert_eq!(out.grid_thw.to_vec(), usizes(&want["grid_thw"]), "{what}: grid_thw");
            let pv_max = check_f32(&what, &out.pixel_values, &want["pixel_values"]);
            let grid = format!("{:?}", out.grid_thw);
            println!("{file:<34} {name:<8} {grid:>12} {decode_max:>10} {resize_max:>10} {pv_max:>14e}");
        }
    }
}

#[test]
fn load_honours_do_convert_rgb() {
    let dir = fixtures();
    let cfg = ImageProcessorConfig { do_convert_rgb: false, ..ImageProcessorConfig::default() };
    assert!(image::load(&dir.join("images/photo_131x97.jpg"), &cfg).is_ok());
    let e = format!("{:#}", image::load(&dir.join("images/rgba_120x45.png"), &cfg).unwrap_err());
    assert!(e.contains("rgba_120x45.png is RGBA") && e.contains("do_convert_rgb"), "{e}");
}
