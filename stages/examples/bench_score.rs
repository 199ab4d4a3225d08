//! Score benchmark: a synthetic mid-size Qwen3-VL language model (random weights), scored
//! by qpipe in-process. `scripts/bench_score.sh` runs it beside ModelOpt + PyTorch on the
//! same checkpoint and tokens and prints both sides' figures.
//!
//!     cargo run -p qpipe-stages --features synth --example bench_score -- gen   <dir>   # checkpoint + tokens
//!     cargo run -p qpipe-stages --features synth --example bench_score -- score <dir> [FORMAT] [METHOD]
//!
//! Shape (defaults, overridable with env vars): hidden 512, 8 layers, intermediate 1536,
//! 8 heads × 64 (4 KV heads), vocab 4096; 32 samples × 128 tokens (left padded), batch 8.
//! `BENCH_PRESET=2b` (or `4b`) starts from that preset's shape instead; `BENCH_DTYPE=bf16`
//! writes the weights in bf16. `QPIPE_BENCH_DTYPE=float64` scores in f64 (both sides).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qpipe_contract::Progress;
use qpipe_stages::score::{self, adapters, FormatParams, Method, Settings};
use qpipe_stages::synth::{self, Shape};
use serde_json::json;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn gen(dir: &Path) -> Result<()> {
    // BENCH_PRESET=2b|4b|mid: the base shape the other variables override.
    let m = Shape::by_name(&std::env::var("BENCH_PRESET").unwrap_or_else(|_| "mid".into()))?;
    let shape = Shape {
        hidden: env_usize("BENCH_HIDDEN", m.hidden),
        layers: env_usize("BENCH_LAYERS", m.layers),
        intermediate: env_usize("BENCH_INTER", m.intermediate),
        heads: env_usize("BENCH_HEADS", m.heads),
        kv_heads: env_usize("BENCH_KV_HEADS", m.kv_heads),
        head_dim: env_usize("BENCH_HEAD_DIM", m.head_dim),
        vocab: env_usize("BENCH_VOCAB", m.vocab),
        max_positions: m.max_positions,
        vision: None,
    };
    let (h, l, inter, v) = (shape.hidden, shape.layers, shape.intermediate, shape.vocab);
    let (samples, seq) = (env_usize("BENCH_SAMPLES", 32), env_usize("BENCH_SEQ", 128));
    // One `model.safetensors` (what the ModelOpt side loads): f32, or bf16 with
    // BENCH_DTYPE=bf16 (real checkpoints' dtype; qpipe then holds the weights in bf16).
    let dtype = match std::env::var("BENCH_DTYPE").as_deref() {
        Ok("bf16") => synth::Dtype::Bf16,
        Ok("f32") | Err(_) => synth::Dtype::F32,
        Ok(other) => bail!("BENCH_DTYPE={other}: use f32 or bf16"),
    };
    synth::write(dir, &shape, dtype, u64::MAX, 0x9e37_79b9, &|_| {})?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Tokens: left padded, each sample 3/4 to all of `seq` long; pad id 0.
    let (mut ids, mut mask) = (vec![], vec![]);
    for _ in 0..samples {
        let len = seq * 3 / 4 + (rng.next_u64() as usize) % (seq / 4 + 1);
        let mut r = vec![0u32; seq - len];
        let mut m = vec![0u32; seq - len];
        for _ in 0..len {
            r.push(3 + (rng.next_u64() % (v as u64 - 8)) as u32);
            m.push(1);
        }
        ids.push(r);
        mask.push(m);
    }
    let tokens =
        json!({"input_ids": ids, "attention_mask": mask, "pad_token_id": 0, "batch_size": env_usize("BENCH_BATCH", 8)});
    std::fs::write(dir.join("tokens.json"), serde_json::to_string(&tokens)?)?;
    eprintln!(
        "wrote {} (hidden {h}, {l} layers, intermediate {inter}, vocab {v}; {samples} × {seq} tokens)",
        dir.display()
    );
    Ok(())
}

/// Prints phases and a rate on stderr.
struct Bar(std::sync::Mutex<(String, u64, Option<u64>, Instant)>);

impl Progress for Bar {
    fn phase(&self, name: &str, total: Option<u64>) {
        *self.0.lock().unwrap() = (name.into(), 0, total, Instant::now());
    }
    fn advance(&self, n: u64) {
        let mut g = self.0.lock().unwrap();
        g.1 += n;
        let el = g.3.elapsed().as_secs_f64();
        let eta = g.2.map(|t| el / g.1 as f64 * (t.saturating_sub(g.1)) as f64).unwrap_or(0.0);
        eprintln!("  {} {}/{} ({el:.1}s, ETA {eta:.1}s)", g.0, g.1, g.2.unwrap_or(0));
    }
    fn note(&self, msg: &str) {
        eprintln!("{msg}");
    }
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`, clock ticks of 1/100 s).
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<f64>().unwrap_or(0.0))
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn score_run(dir: &Path, format: &str, method: &str) -> Result<()> {
    qpipe_compute::malloc::keep_freed_memory();
    let t0 = Instant::now();
    let tokens: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json"))?)?;
    let ids: Vec<Vec<u32>> = serde_json::from_value(tokens["input_ids"].clone())?;
    let mask: Vec<Vec<u32>> = serde_json::from_value(tokens["attention_mask"].clone())?;
    let bs = tokens["batch_size"].as_u64().context("batch_size")? as usize;
    let batches = score::make_batches(&ids, &mask, tokens["pad_token_id"].as_u64().unwrap_or(0) as u32, bs);
    // `QPIPE_BENCH_DTYPE=float64` (as the ModelOpt side reads it): score in f64.
    let dtype = match std::env::var("QPIPE_BENCH_DTYPE").as_deref() {
        Ok("float64") => candle_core::DType::F64,
        Ok("float32") | Err(_) => candle_core::DType::F32,
        Ok(other) => bail!("QPIPE_BENCH_DTYPE={other}: use float32 or float64"),
    };
    let model = adapters::load_model_with(dir, dtype)?;
    let fmt = adapters::load_format(&FormatParams {
        name: format.into(),
        granularity: None,
        quant_cfg_overrides: json!({}),
    })?;
    let settings = Settings {
        method: Method::parse(method)?,
        batch_size: bs,
        score_size: 128,
        device: "cpu".into(),
        memory_limit: None,
    };
    let load_s = t0.elapsed().as_secs_f64();
    let (t1, c1) = (Instant::now(), cpu_s());
    let state = score::run_scoring(
        model.as_ref(),
        fmt.as_ref(),
        &batches,
        &settings,
        &Bar(std::sync::Mutex::new((String::new(), 0, None, Instant::now()))),
    )?;
    let (score_s, score_cpu_s) = (t1.elapsed().as_secs_f64(), cpu_s() - c1);
    let state = qpipe_stages::search::complete(&state, settings.method, 8.0)?;
    let suffix = if dtype == candle_core::DType::F64 { "_float64" } else { "" };
    std::fs::write(dir.join(format!("qpipe_state_{method}{suffix}.json")), serde_json::to_string_pretty(&state)?)?;
    println!(
        "{}",
        json!({"side": "qpipe", "format": format, "method": method, "load_s": load_s, "score_s": score_s, "score_cpu_s": score_cpu_s,
               "threads": rayon::current_num_threads(), "peak_rss_mib": peak_rss_mib()})
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gen") => gen(&PathBuf::from(args.get(1).context("gen <dir>")?)),
        Some("score") => score_run(
            &PathBuf::from(args.get(1).context("score <dir>")?),
            args.get(2).map(String::as_str).unwrap_or("INT8_DEFAULT_CFG"),
            args.get(3).map(String::as_str).unwrap_or("gradient"),
        ),
        _ => bail!("usage: bench_score gen <dir> | score <dir> [FORMAT] [METHOD]"),
    }
}
