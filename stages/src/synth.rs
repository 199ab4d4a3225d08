//! Synthetic Qwen3-VL checkpoints: real language-model shapes, random weights. For timing
//! and memory runs at sizes no test can ship (a Qwen3-VL-4B-Instruct-shaped language model
//! is 4.0 B parameters, 8 GB in bf16) and for tests of the checkpoint readers.
//!
//! [`write`] produces what the Hub's Qwen3-VL checkpoints look like to qpipe: a
//! `config.json` in the transformers 4.57 dialect (`text_config` with `rope_scaling` and
//! `rope_theta`), the language model's tensors under `model.language_model.` (tied
//! embeddings, no `lm_head`) and, with a [`VisionShape`], the vision tower's under
//! `model.visual.` with a `preprocessor_config.json` (else none), in
//! safetensors shards of at most `shard_bytes` each plus `model.safetensors.index.json`,
//! or one `model.safetensors` when everything fits in one shard.
//!
//! Weights are uniform with standard deviation 0.02 (norm weights are 1), drawn from a
//! generator seeded per tensor and chunk: a shape, dtype and seed always give the same
//! bytes, whatever the thread count. Tensors are generated and written one at a time, so
//! memory stays at the largest tensor (the embedding: 0.8 GB in bf16 at 4B); each file is
//! written under a temporary name and renamed into place, the index last.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

/// The shape of a Qwen3-VL language model (and, with [`Shape::vision`], its vision tower).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_positions: usize,
    /// The vision tower's tensors too (`model.visual.*`), and its `vision_config`.
    pub vision: Option<VisionShape>,
}

/// The shape of a Qwen3-VL vision tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionShape {
    pub depth: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub patch: usize,
    pub temporal_patch: usize,
    pub merge: usize,
    pub num_position_embeddings: usize,
    pub deepstack: &'static [usize],
}

impl VisionShape {
    /// Qwen3-VL-4B-Instruct's vision tower (its Hub `config.json`; the legacy all-layers
    /// manifests' costs agree): 24 blocks of hidden 1024, MLP 4096, 16 heads, 16-pixel
    /// patches, 2×2 merge, a 48×48 position grid, DeepStack after blocks 5, 11 and 17.
    pub const QWEN3_VL_4B: VisionShape = VisionShape {
        depth: 24,
        hidden: 1024,
        intermediate: 4096,
        heads: 16,
        patch: 16,
        temporal_patch: 2,
        merge: 2,
        num_position_embeddings: 2304,
        deepstack: &[5, 11, 17],
    };

    /// Every tensor of the tower: name and shape (`out` is the language model's hidden size).
    pub fn tensors(&self, out: usize) -> Vec<(String, Vec<usize>)> {
        let (h, i, m) = (self.hidden, self.intermediate, self.hidden * self.merge * self.merge);
        let p = "model.visual.";
        let mut v = vec![
            (format!("{p}patch_embed.proj.weight"), vec![h, 3, self.temporal_patch, self.patch, self.patch]),
            (format!("{p}patch_embed.proj.bias"), vec![h]),
            (format!("{p}pos_embed.weight"), vec![self.num_position_embeddings, h]),
        ];
        for b in 0..self.depth {
            for (name, shape) in [
                ("norm1.weight", vec![h]),
                ("norm1.bias", vec![h]),
                ("attn.qkv.weight", vec![3 * h, h]),
                ("attn.qkv.bias", vec![3 * h]),
                ("attn.proj.weight", vec![h, h]),
                ("attn.proj.bias", vec![h]),
                ("norm2.weight", vec![h]),
                ("norm2.bias", vec![h]),
                ("mlp.linear_fc1.weight", vec![i, h]),
                ("mlp.linear_fc1.bias", vec![i]),
                ("mlp.linear_fc2.weight", vec![h, i]),
                ("mlp.linear_fc2.bias", vec![h]),
            ] {
                v.push((format!("{p}blocks.{b}.{name}"), shape));
            }
        }
        let merger = |q: String, norm: usize| {
            vec![
                (format!("{q}norm.weight"), vec![norm]),
                (format!("{q}norm.bias"), vec![norm]),
                (format!("{q}linear_fc1.weight"), vec![m, m]),
                (format!("{q}linear_fc1.bias"), vec![m]),
                (format!("{q}linear_fc2.weight"), vec![out, m]),
                (format!("{q}linear_fc2.bias"), vec![out]),
            ]
        };
        v.extend(merger(format!("{p}merger."), h));
        for j in 0..self.deepstack.len() {
            v.extend(merger(format!("{p}deepstack_merger_list.{j}."), m));
        }
        v
    }

    fn config(&self, out: usize) -> Value {
        json!({
            "deepstack_visual_indexes": self.deepstack, "depth": self.depth, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": self.hidden, "in_channels": 3, "initializer_range": 0.02,
            "intermediate_size": self.intermediate, "model_type": "qwen3_vl_vision", "num_heads": self.heads,
            "num_position_embeddings": self.num_position_embeddings, "out_hidden_size": out,
            "patch_size": self.patch, "spatial_merge_size": self.merge, "temporal_patch_size": self.temporal_patch
        })
    }

    /// A `preprocessor_config.json` as Qwen3-VL's (mean and std 0.5, 16-pixel patches),
    /// for this tower's patch and merge sizes.
    pub fn preprocessor_config(&self) -> Value {
        let factor = self.patch * self.merge;
        json!({
            "image_processor_type": "Qwen2VLImageProcessor", "do_resize": true, "do_rescale": true,
            "rescale_factor": 1.0 / 255.0, "do_normalize": true, "do_convert_rgb": true, "resample": 3,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "patch_size": self.patch, "temporal_patch_size": self.temporal_patch, "merge_size": self.merge,
            "min_pixels": factor * factor * 4, "max_pixels": 16_777_216,
            "size": {"shortest_edge": factor * factor * 4, "longest_edge": 16_777_216}
        })
    }
}

impl Shape {
    /// Qwen3-VL-4B-Instruct's language model (its Hub `config.json`).
    pub const QWEN3_VL_4B: Shape = Shape {
        hidden: 2560,
        layers: 36,
        intermediate: 9728,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        vocab: 151_936,
        max_positions: 262_144,
        vision: None,
    };

    /// The score benchmark's mid-size model (`scripts/bench_score.sh`).
    pub const MID: Shape = Shape {
        hidden: 512,
        layers: 8,
        intermediate: 1536,
        heads: 8,
        kv_heads: 4,
        head_dim: 64,
        vocab: 4096,
        max_positions: 4096,
        vision: None,
    };

    /// Qwen3-VL-2B-Instruct's language model (28 layers, hidden 2048, tied embeddings).
    pub const QWEN3_VL_2B: Shape = Shape {
        hidden: 2048,
        layers: 28,
        intermediate: 6144,
        heads: 16,
        kv_heads: 8,
        head_dim: 128,
        vocab: 151_936,
        max_positions: 262_144,
        vision: None,
    };

    /// A shape by name: `4b` (also `qwen3-vl-4b`), `2b` (`qwen3-vl-2b`) or `mid`.
    pub fn by_name(name: &str) -> Result<Shape> {
        match name {
            "4b" | "qwen3-vl-4b" => Ok(Self::QWEN3_VL_4B),
            "2b" | "qwen3-vl-2b" => Ok(Self::QWEN3_VL_2B),
            "mid" => Ok(Self::MID),
            other => bail!("unknown synthetic shape `{other}`; use `4b`, `2b` or `mid`"),
        }
    }

    /// Checks that the shape can be built: every size at least 1, the heads a multiple of
    /// the KV heads (grouped attention), an even head dim (rotary halves).
    pub fn check(&self) -> Result<()> {
        for (name, v) in [
            ("--layers", self.layers),
            ("--hidden", self.hidden),
            ("--intermediate", self.intermediate),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("--head-dim", self.head_dim),
            ("--vocab", self.vocab),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            bail!("--heads {} is not a multiple of --kv-heads {}", self.heads, self.kv_heads);
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("--head-dim {} must be even (rotary embeddings rotate halves)", self.head_dim);
        }
        Ok(())
    }

    /// Every tensor, in the order the files hold them: name and shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden, self.intermediate, self.head_dim);
        let p = "model.language_model.";
        let mut out = vec![(format!("{p}embed_tokens.weight"), vec![self.vocab, h])];
        for l in 0..self.layers {
            let q = format!("{p}layers.{l}.");
            for (name, shape) in [
                ("input_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![self.heads * hd, h]),
                ("self_attn.k_proj.weight", vec![self.kv_heads * hd, h]),
                ("self_attn.v_proj.weight", vec![self.kv_heads * hd, h]),
                ("self_attn.q_norm.weight", vec![hd]),
                ("self_attn.k_norm.weight", vec![hd]),
                ("self_attn.o_proj.weight", vec![h, self.heads * hd]),
                ("post_attention_layernorm.weight", vec![h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                out.push((format!("{q}{name}"), shape));
            }
        }
        out.push((format!("{p}norm.weight"), vec![h]));
        if let Some(v) = &self.vision {
            out.extend(v.tensors(h));
        }
        out
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn params(&self) -> u64 {
        self.tensors().iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum()
    }

    /// `config.json` in the transformers 4.57 dialect, as the Hub's Qwen3-VL-4B has it.
    pub fn config(&self, dtype: Dtype) -> Value {
        let v = self.vocab as u64;
        self.config_with_ids(dtype, [v - 1, v - 2, v - 3, v - 4])
    }

    /// [`Self::config`] with the image, video, vision-start and vision-end token ids of the
    /// tokenizer the checkpoint goes with.
    pub fn config_with_ids(&self, dtype: Dtype, [image, video, start, end]: [u64; 4]) -> Value {
        let half = self.head_dim / 2;
        // Qwen3-VL-4B: head_dim 128 → [24, 20, 20]; other head dims scaled alike.
        let t = half * 3 / 8;
        let hw = half * 5 / 16;
        let section = [t, hw, half - t - hw];
        let v = self.vocab;
        json!({
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "image_token_id": image, "video_token_id": video, "vision_start_token_id": start, "vision_end_token_id": end,
            "tie_word_embeddings": true,
            "transformers_version": "4.57.0",
            "text_config": {
                "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2,
                "dtype": dtype.torch_name(), "head_dim": self.head_dim, "hidden_act": "silu",
                "hidden_size": self.hidden, "initializer_range": 0.02, "intermediate_size": self.intermediate,
                "max_position_embeddings": self.max_positions, "model_type": "qwen3_vl_text",
                "num_attention_heads": self.heads, "num_hidden_layers": self.layers,
                "num_key_value_heads": self.kv_heads, "pad_token_id": 0, "rms_norm_eps": 1e-6,
                "rope_scaling": {"mrope_interleaved": true, "mrope_section": section, "rope_type": "default"},
                "rope_theta": 5_000_000.0, "tie_word_embeddings": true, "use_cache": true, "vocab_size": v
            },
            "vision_config": match &self.vision {
                Some(vs) => vs.config(self.hidden),
                None => json!({
                    "deepstack_visual_indexes": [0], "depth": 1, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32,
                    "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64,
                    "model_type": "qwen3_vl_vision", "num_heads": 2, "num_position_embeddings": 16,
                    "out_hidden_size": self.hidden, "patch_size": 8, "spatial_merge_size": 2,
                    "temporal_patch_size": 2
                }),
            }
        })
    }
}

/// Element type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    pub fn parse(s: &str) -> Result<Dtype> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            other => bail!("unknown dtype `{other}`; use `bf16` or `f32`"),
        }
    }
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
    fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::Bf16 => "BF16",
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
        }
    }
}

/// What [`write`] wrote.
#[derive(Debug, Clone)]
pub struct Summary {
    pub params: u64,
    pub bytes: u64,
    /// File names of the shards, in order.
    pub files: Vec<String>,
}

/// Values per generator chunk (each chunk has its own seed, so chunks run in parallel).
const CHUNK: usize = 1 << 16;

/// SplitMix64: a seed per (tensor, chunk), then xorshift-multiply steps.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How a tensor is filled: norm weights with ones, biases with zeros, the rest randomly.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Ones,
    Zeros,
    Random,
}

fn fill_of(name: &str, shape: &[usize]) -> Fill {
    if name.ends_with(".bias") {
        Fill::Zeros
    } else if shape.len() == 1 {
        Fill::Ones
    } else {
        Fill::Random
    }
}

/// The little-endian bytes of one tensor: ones for norm weights (1-D), zeros for biases,
/// else uniform values with standard deviation 0.02.
fn tensor_bytes(index: usize, numel: usize, fill: Fill, dtype: Dtype, seed: u64) -> Vec<u8> {
    let size = dtype.size();
    let mut out = vec![0u8; numel * size];
    let half_width = 0.02f32 * 3f32.sqrt(); // uniform on [-a, a] has std a/√3
    out.par_chunks_mut(CHUNK * size).enumerate().for_each(|(c, bytes)| {
        let mut state = splitmix(seed ^ splitmix(index as u64) ^ splitmix((c as u64) << 20));
        for e in bytes.chunks_exact_mut(size) {
            let v = if fill == Fill::Ones {
                1.0
            } else if fill == Fill::Zeros {
                0.0
            } else {
                state = splitmix(state);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                (2.0 * u - 1.0) * half_width
            };
            match dtype {
                Dtype::F32 => e.copy_from_slice(&v.to_le_bytes()),
                Dtype::Bf16 => e.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
            }
        }
    });
    out
}

/// Writes one safetensors file holding `tensors` (indices into `all`), streaming each
/// tensor's bytes after the header; returns its data size.
fn write_shard(
    path: &Path,
    all: &[(String, Vec<usize>)],
    tensors: &[usize],
    dtype: Dtype,
    seed: u64,
    progress: &dyn Fn(u64),
) -> Result<u64> {
    let mut header = Map::new();
    let mut offset = 0u64;
    for &i in tensors {
        let (name, shape) = &all[i];
        let n = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
        header.insert(
            name.clone(),
            json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut text = serde_json::to_string(&Value::Object(header))?;
    // Pad the header with spaces so the data starts 8-byte aligned, as the safetensors crate does.
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let write = || -> Result<()> {
        let mut f = BufWriter::with_capacity(1 << 22, File::create(&tmp)?);
        f.write_all(&(text.len() as u64).to_le_bytes())?;
        f.write_all(text.as_bytes())?;
        for &i in tensors {
            let (name, shape) = &all[i];
            let bytes = tensor_bytes(i, shape.iter().product(), fill_of(name, shape), dtype, seed);
            f.write_all(&bytes).with_context(|| format!("writing tensor {name}"))?;
            progress(bytes.len() as u64);
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(offset)
}

/// Writes a synthetic checkpoint of `shape` into `dir` (created if needed): `config.json`,
/// the weight files and, when sharded, the index. `progress` gets the bytes written as they
/// are written.
pub fn write(
    dir: &Path,
    shape: &Shape,
    dtype: Dtype,
    shard_bytes: u64,
    seed: u64,
    progress: &dyn Fn(u64),
) -> Result<Summary> {
    if !shape.heads.is_multiple_of(shape.kv_heads.max(1)) || !shape.head_dim.is_multiple_of(2) {
        bail!("shape {shape:?}: heads must be a multiple of kv_heads and head_dim even");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let all = shape.tensors();
    let size = |i: usize| all[i].1.iter().product::<usize>() as u64 * dtype.size() as u64;
    // Plan the shards: tensors in order, a new shard when the next one would overflow.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0u64;
    for i in 0..all.len() {
        if used > 0 && used + size(i) > shard_bytes {
            shards.push(Vec::new());
            used = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        used += size(i);
    }
    let files: Vec<String> = if shards.len() == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=shards.len()).map(|k| format!("model-{k:05}-of-{:05}.safetensors", shards.len())).collect()
    };
    let config = serde_json::to_string_pretty(&shape.config(dtype))? + "\n";
    std::fs::write(dir.join("config.json"), config).context("writing config.json")?;
    if let Some(v) = &shape.vision {
        let pre = serde_json::to_string_pretty(&v.preprocessor_config())? + "\n";
        std::fs::write(dir.join("preprocessor_config.json"), pre).context("writing preprocessor_config.json")?;
    }
    let mut total = 0u64;
    let mut weight_map = Map::new();
    for (file, tensors) in files.iter().zip(&shards) {
        total += write_shard(&dir.join(file), &all, tensors, dtype, seed, progress)?;
        for &i in tensors {
            weight_map.insert(all[i].0.clone(), Value::String(file.clone()));
        }
    }
    if files.len() > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let tmp = dir.join("model.safetensors.index.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&index)? + "\n")?;
        std::fs::rename(&tmp, dir.join("model.safetensors.index.json"))?;
    }
    Ok(Summary { params: shape.params(), bytes: total, files })
}

/// Copies the tokenizer files (`tokenizer.json`, and `tokenizer_config.json` when present)
/// of the checkpoint folder `from` into `to`, so the synthetic checkpoint can go through
/// the whole pipeline (build-calib tokenizes with it). Its vocabulary must not exceed the
/// shape's.
pub fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    for (name, required) in [("tokenizer.json", true), ("tokenizer_config.json", false)] {
        let src = from.join(name);
        if !src.exists() && !required {
            continue;
        }
        std::fs::copy(&src, to.join(name)).with_context(|| format!("copying the tokenizer file {}", src.display()))?;
    }
    // The image token ids of `config.json` follow the tokenizer's vision tokens, when it has them.
    let tok: Value = serde_json::from_slice(&std::fs::read(from.join("tokenizer.json"))?)?;
    let id =
        |t: &str| tok["added_tokens"].as_array()?.iter().find(|a| a["content"] == t).and_then(|a| a["id"].as_u64());
    if let (Some(image), Some(video), Some(start), Some(end)) =
        (id("<|image_pad|>"), id("<|video_pad|>"), id("<|vision_start|>"), id("<|vision_end|>"))
    {
        let path = to.join("config.json");
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        for (k, v) in [
            ("image_token_id", image),
            ("video_token_id", video),
            ("vision_start_token_id", start),
            ("vision_end_token_id", end),
        ] {
            cfg[k] = json!(v);
        }
        std::fs::write(&path, serde_json::to_string_pretty(&cfg)? + "\n")?;
    }
    Ok(())
}

/// Writes `n` synthetic `size`×`size` RGB PNG images (smooth seeded patterns: gradients
/// and stripes) into `dir/images/` and a COCO captions file `dir/captions.json` with one
/// annotation per image, its caption taken in turn from `captions`.
pub fn write_coco(dir: &Path, n: usize, size: usize, captions: &[String], seed: u64) -> Result<()> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let mut imgs = Vec::new();
    let mut anns = Vec::new();
    for k in 0..n {
        let name = format!("{k:012}.png");
        let r = splitmix(seed ^ splitmix(k as u64));
        let (fx, fy, phase) = ((r & 0xff) as f32 / 40.0 + 1.0, ((r >> 8) & 0xff) as f32 / 40.0 + 1.0, (r >> 16) as f32);
        let mut px = Vec::with_capacity(size * size * 3);
        for y in 0..size {
            for x in 0..size {
                let (u, v) = (x as f32 / size as f32, y as f32 / size as f32);
                for c in 0..3 {
                    let w = ((u * fx + v * fy) * std::f32::consts::PI * (c + 1) as f32 + phase).sin();
                    px.push((127.5 + 120.0 * w) as u8);
                }
            }
        }
        let file = File::create(images.join(&name)).with_context(|| format!("creating {name}"))?;
        let mut enc = png::Encoder::new(BufWriter::new(file), size as u32, size as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&px)?;
        imgs.push(json!({"id": k + 1, "file_name": name, "width": size, "height": size}));
        let caption = captions.get(k % captions.len().max(1)).cloned().unwrap_or_else(|| "An image.".into());
        anns.push(json!({"id": k + 1, "image_id": k + 1, "caption": caption}));
    }
    let doc = json!({"info": {"description": "synthetic images (qpipe synth)"}, "images": imgs, "annotations": anns});
    std::fs::write(dir.join("captions.json"), serde_json::to_string_pretty(&doc)? + "\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn presets_by_name_and_shapes_that_cannot_be_built() {
        let two = Shape::by_name("2b").unwrap();
        // 28 × (q, k, v, o, gate, up, down, 4 norms) + tied embeddings + final norm.
        assert_eq!(two.params(), 1_720_574_976);
        assert_eq!(Shape::by_name("qwen3-vl-4b").unwrap(), Shape::by_name("4b").unwrap());
        assert!(Shape::by_name("7b").unwrap_err().to_string().contains("`4b`, `2b` or `mid`"));
        assert!(two.check().is_ok());
        let e = Shape { kv_heads: 3, ..two }.check().unwrap_err().to_string();
        assert!(e.contains("--heads 16 is not a multiple of --kv-heads 3"), "{e}");
        assert!(Shape { layers: 0, ..two }.check().unwrap_err().to_string().contains("--layers"));
        assert!(Shape { head_dim: 63, ..two }.check().is_err());
    }

    use super::*;

    const TINY: Shape = Shape {
        hidden: 64,
        layers: 2,
        intermediate: 96,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        vocab: 300,
        max_positions: 256,
        vision: None,
    };

    #[test]
    fn the_4b_shape_has_qwen3_vl_4b_language_model_size() {
        let p = Shape::QWEN3_VL_4B.params();
        // 389 M embedding + 36 × 101 M per layer: about 4.02 B, tied lm_head.
        assert!((4_000_000_000..4_050_000_000).contains(&p), "{p}");
        assert_eq!(
            Shape::QWEN3_VL_4B.config(Dtype::Bf16)["text_config"]["rope_scaling"]["mrope_section"],
            json!([24, 20, 20])
        );
        assert!(Shape::by_name("qwen3-vl-9b").unwrap_err().to_string().contains("`4b`"));
    }

    #[test]
    fn sharded_bf16_checkpoint_loads_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let written = std::sync::atomic::AtomicU64::new(0);
        let count = |n: u64| {
            written.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        let s = write(dir.path(), &TINY, Dtype::Bf16, 40_000, 7, &count).unwrap();
        assert!(s.files.len() > 2, "{:?}", s.files);
        assert_eq!(s.bytes, TINY.params() * 2);
        assert_eq!(written.into_inner(), s.bytes);
        // The readers accept it: shards, index, config dialect, bf16 weights.
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny_qwen3_vl/checkpoint");
        copy_tokenizer(&tiny, dir.path()).unwrap();
        let info = crate::io::checkpoint::check_dir(dir.path()).unwrap();
        assert!(format!("{info:?}").contains("model-00001-of"), "{info:?}");
        let m = qpipe_model::TextModel::load(dir.path()).unwrap();
        assert_eq!(m.num_linears(), 14);
        let w = m.linear_weight_by_name("layers.1.mlp.down_proj").unwrap();
        assert_eq!(w.dims(), &[64, 96]);
        let w = w.to_dtype(candle_core::DType::F32).unwrap();
        let std = w.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!((0.018..0.022).contains(&std), "std {std}");
        // Same shape, dtype and seed: the same bytes; another seed: others.
        let again = tempfile::tempdir().unwrap();
        write(again.path(), &TINY, Dtype::Bf16, 40_000, 7, &|_| {}).unwrap();
        let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
        for f in &s.files {
            assert_eq!(read(dir.path(), f), read(again.path(), f), "{f}");
        }
        write(again.path(), &TINY, Dtype::Bf16, 40_000, 8, &|_| {}).unwrap();
        assert_ne!(read(dir.path(), &s.files[1]), read(again.path(), &s.files[1]));
        // One shard when everything fits, f32.
        let one = tempfile::tempdir().unwrap();
        let s = write(one.path(), &TINY, Dtype::F32, u64::MAX, 7, &|_| {}).unwrap();
        assert_eq!(s.files, ["model.safetensors"]);
        assert!(!one.path().join("model.safetensors.index.json").exists());
        qpipe_model::TextModel::load(one.path()).unwrap();
    }
}
