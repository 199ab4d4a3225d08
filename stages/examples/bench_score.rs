//! Score benchmark: a synthetic mid-size Qwen3-VL language model (random weights), scored
//! by qpipe in-process. `scripts/bench_score.sh` runs it beside ModelOpt + PyTorch on the
//! same checkpoint and tokens and prints both sides' figures.
//!
//!     cargo run -p qpipe-stages --example bench_score -- gen   <dir>   # checkpoint + tokens
//!     cargo run -p qpipe-stages --example bench_score -- score <dir> [FORMAT] [METHOD]
//!
//! Shape (defaults, overridable with env vars): hidden 512, 8 layers, intermediate 1536,
//! 8 heads × 64 (4 KV heads), vocab 4096; 32 samples × 128 tokens (left padded), batch 8.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use qpipe_stages::contract::Progress;
use qpipe_stages::score::{self, adapters, FormatParams, Method, Settings};
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
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

fn gen(dir: &Path) -> Result<()> {
    let (h, l, inter, v) = (
        env_usize("BENCH_HIDDEN", 512),
        env_usize("BENCH_LAYERS", 8),
        env_usize("BENCH_INTER", 1536),
        env_usize("BENCH_VOCAB", 4096),
    );
    let (heads, kv, hd) =
        (env_usize("BENCH_HEADS", 8), env_usize("BENCH_KV_HEADS", 4), env_usize("BENCH_HEAD_DIM", 64));
    let (samples, seq) = (env_usize("BENCH_SAMPLES", 32), env_usize("BENCH_SEQ", 128));
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let rand = |shape: &[usize], std: f32, rng: &mut Rng| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() * std).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let p = "model.language_model.";
    t.insert(format!("{p}embed_tokens.weight"), rand(&[v, h], 0.02, &mut rng)?);
    t.insert(format!("{p}norm.weight"), Tensor::ones(h, candle_core::DType::F32, &dev)?);
    for i in 0..l {
        let q = format!("{p}layers.{i}.");
        for (name, shape) in [
            ("self_attn.q_proj.weight", [heads * hd, h]),
            ("self_attn.k_proj.weight", [kv * hd, h]),
            ("self_attn.v_proj.weight", [kv * hd, h]),
            ("self_attn.o_proj.weight", [h, heads * hd]),
            ("mlp.gate_proj.weight", [inter, h]),
            ("mlp.up_proj.weight", [inter, h]),
            ("mlp.down_proj.weight", [h, inter]),
        ] {
            t.insert(format!("{q}{name}"), rand(&shape, 0.02, &mut rng)?);
        }
        for (name, n) in [
            ("input_layernorm.weight", h),
            ("post_attention_layernorm.weight", h),
            ("self_attn.q_norm.weight", hd),
            ("self_attn.k_norm.weight", hd),
        ] {
            t.insert(format!("{q}{name}"), Tensor::ones(n, candle_core::DType::F32, &dev)?);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    let half = hd / 2;
    let s = [half * 3 / 8, half * 5 / 16, half - half * 3 / 8 - half * 5 / 16];
    let config = json!({
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "dtype": "float32",
        "image_token_id": v - 1, "video_token_id": v - 2, "vision_start_token_id": v - 3, "vision_end_token_id": v - 4,
        "tie_word_embeddings": true,
        "text_config": {
            "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "head_dim": hd,
            "hidden_act": "silu", "hidden_size": h, "initializer_range": 0.02, "intermediate_size": inter,
            "max_position_embeddings": 4096, "model_type": "qwen3_vl_text", "num_attention_heads": heads,
            "num_hidden_layers": l, "num_key_value_heads": kv, "pad_token_id": 0, "rms_norm_eps": 1e-6,
            "rope_parameters": {"mrope_interleaved": true, "mrope_section": s, "rope_theta": 5000000.0, "rope_type": "default"},
            "use_cache": false, "vocab_size": v
        },
        "vision_config": {"deepstack_visual_indexes": [0], "depth": 1, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32,
            "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64, "model_type": "qwen3_vl_vision", "num_heads": 2,
            "num_position_embeddings": 16, "out_hidden_size": h, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
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
    score::keep_freed_memory();
    let t0 = Instant::now();
    let tokens: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json"))?)?;
    let ids: Vec<Vec<u32>> = serde_json::from_value(tokens["input_ids"].clone())?;
    let mask: Vec<Vec<u32>> = serde_json::from_value(tokens["attention_mask"].clone())?;
    let bs = tokens["batch_size"].as_u64().context("batch_size")? as usize;
    let batches = score::make_batches(&ids, &mask, tokens["pad_token_id"].as_u64().unwrap_or(0) as u32, bs);
    let model = adapters::load_model(dir)?;
    let fmt = adapters::load_format(&FormatParams {
        name: format.into(),
        granularity: None,
        quant_cfg_overrides: json!({}),
    })?;
    let settings = Settings {
        method: Method::parse(method)?,
        batch_size: bs,
        score_size: 128,
        effective_bits: 8.0,
        device: "cpu".into(),
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
    std::fs::write(dir.join(format!("qpipe_state_{method}.json")), serde_json::to_string_pretty(&state)?)?;
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
