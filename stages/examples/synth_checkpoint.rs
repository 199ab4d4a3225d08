//! Writes a synthetic Qwen3-VL checkpoint with real language-model shapes and random
//! weights (see `qpipe_stages::synth`), for timing and memory runs of the score stage.
//!
//!     cargo run --release -p qpipe-stages --features synth --example synth_checkpoint -- <dir> \
//!         [--preset 4b|2b|mid] [--layers N --hidden H --intermediate I --heads Q \
//!          --kv-heads K --head-dim D --vocab V] [--dtype bf16|f32] [--shard-gib 4] \
//!         [--seed 0] [--tokenizer-from models/tiny_qwen3_vl/checkpoint]
//!
//! Presets: `4b` (the default) is Qwen3-VL-4B-Instruct's language model (36 layers, hidden
//! 2560, intermediate 9728, 32 heads, 8 KV heads, head dim 128, vocab 151936, tied
//! embeddings); `2b` Qwen3-VL-2B's (28 layers, hidden 2048, intermediate 6144, 16/8 heads,
//! head dim 128, vocab 151936, tied); `mid` the score benchmark's. The size options change
//! the preset's. bf16, 4 GiB shards with an index, the embedded tiny model's tokenizer (so
//! `qpipe build model.path=<dir>` can tokenize captions for it). Prints the parameter count.
//!
//! `--vision 4b` adds Qwen3-VL-4B's vision tower (24 blocks of 1024, patch 16, merge 2,
//! DeepStack after blocks 5, 11, 17) and a `preprocessor_config.json`; `--coco DIR` also
//! writes `--images N` synthetic `--image-size`×`--image-size` PNGs and a COCO captions file
//! there (`scripts/bench_vl.sh` times a whole-model build on them).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qpipe_stages::synth::{self, Dtype, Shape};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let (mut shape, mut dtype, mut shard_gib, mut seed) = (Shape::QWEN3_VL_4B, Dtype::Bf16, 4.0f64, 0u64);
    let mut tokenizer = Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny_qwen3_vl/checkpoint")));
    let (mut coco, mut images, mut image_size): (Option<PathBuf>, usize, usize) = (None, 16, 448);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("`{a}` needs a value"));
        match a.as_str() {
            "--shape" | "--preset" => shape = Shape::by_name(&value()?)?,
            "--layers" => shape.layers = value()?.parse().context("--layers: a whole number")?,
            "--hidden" => shape.hidden = value()?.parse().context("--hidden: a whole number")?,
            "--intermediate" => shape.intermediate = value()?.parse().context("--intermediate: a whole number")?,
            "--heads" => shape.heads = value()?.parse().context("--heads: a whole number")?,
            "--kv-heads" => shape.kv_heads = value()?.parse().context("--kv-heads: a whole number")?,
            "--head-dim" => shape.head_dim = value()?.parse().context("--head-dim: a whole number")?,
            "--vocab" => shape.vocab = value()?.parse().context("--vocab: a whole number")?,
            "--dtype" => dtype = Dtype::parse(&value()?)?,
            "--shard-gib" => shard_gib = value()?.parse().context("--shard-gib: a number of GiB")?,
            "--seed" => seed = value()?.parse().context("--seed: an integer")?,
            "--tokenizer-from" => tokenizer = Some(PathBuf::from(value()?)),
            "--vision" => {
                shape.vision = match value()?.as_str() {
                    "4b" => Some(synth::VisionShape::QWEN3_VL_4B),
                    "none" => None,
                    other => bail!("--vision: `{other}` (valid: 4b, none)"),
                }
            }
            "--coco" => coco = Some(PathBuf::from(value()?)),
            "--images" => images = value()?.parse().context("--images: a whole number")?,
            "--image-size" => image_size = value()?.parse().context("--image-size: pixels")?,
            "--no-tokenizer" => tokenizer = None,
            "-h" | "--help" => {
                eprintln!(
                    "usage: synth_checkpoint <dir> [--preset 4b|2b|mid] [--layers N] [--hidden H] [--intermediate I] \
                     [--heads Q] [--kv-heads K] [--head-dim D] [--vocab V] [--dtype bf16|f32] [--shard-gib N] \
                     [--seed N] [--tokenizer-from DIR | --no-tokenizer] [--vision 4b|none] \
                     [--coco DIR [--images N] [--image-size PX]]"
                );
                return Ok(());
            }
            s if s.starts_with('-') => bail!("unknown option `{s}` (see --help)"),
            s => dir = Some(PathBuf::from(s)),
        }
    }
    let dir = dir.context("give the folder to write the checkpoint into (see --help)")?;
    shape.check()?;
    println!("{} parameters", shape.params());
    let total = shape.params() * if dtype == Dtype::Bf16 { 2 } else { 4 };
    eprintln!(
        "writing {} ({:.2} B parameters, {:.2} GiB {dtype:?}) into {}",
        match shape {
            Shape::QWEN3_VL_4B => "a Qwen3-VL-4B-shaped language model",
            Shape::QWEN3_VL_2B => "a Qwen3-VL-2B-shaped language model",
            _ => "a synthetic model",
        },
        shape.params() as f64 / 1e9,
        total as f64 / (1u64 << 30) as f64,
        dir.display()
    );
    let t0 = Instant::now();
    let done = AtomicU64::new(0);
    let step = (total / 20).max(1);
    let progress = |n: u64| {
        let before = done.fetch_add(n, Ordering::Relaxed);
        if (before + n) / step != before / step {
            let s = t0.elapsed().as_secs_f64();
            let frac = (before + n) as f64 / total as f64;
            eprintln!("  {:3.0} % ({s:.0} s, ETA {:.0} s)", frac * 100.0, s / frac - s);
        }
    };
    let shard_bytes = (shard_gib * (1u64 << 30) as f64) as u64;
    let summary = synth::write(&dir, &shape, dtype, shard_bytes, seed, &progress)?;
    if let Some(from) = tokenizer {
        synth::copy_tokenizer(&from, &dir)?;
    }
    if let Some(coco) = coco {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/calibration/captions.txt"))?;
        let captions: Vec<String> = text.lines().map(str::to_string).collect();
        synth::write_coco(&coco, images, image_size, &captions, seed)?;
        eprintln!("wrote {images} images of {image_size}×{image_size} and {}", coco.join("captions.json").display());
    }
    eprintln!(
        "wrote {} file(s), {:.2} GiB, in {:.1} s",
        summary.files.len(),
        summary.bytes as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
