//! The Qwen3-VL vision tower in candle, with hookable Linears and a hand-written backward
//! pass that yields dL/dy of every Linear output (as [`crate::TextModel`] does for the
//! language model).
//!
//! # Structure (transformers 5.x `Qwen3VLVisionModel`)
//!
//! `pixel_values: [P, C·T·p·p]` — one row per patch, patches of each image in
//! spatial-merge-block order, as `Qwen2VLImageProcessor` writes them — →
//! `patch_embed.proj` (a Conv3d whose stride equals its kernel: a Linear over the flattened
//! patch, with bias) → `+` the learned position embedding, bilinearly resampled
//! (`align_corners=True`) from its square grid to each image's patch grid → per block
//! [`norm1` (LayerNorm) → `attn.qkv` → 2-D rotary (h and w frequencies, rotate-half over
//! the whole head) → full attention within each image frame → `attn.proj` → residual →
//! `norm2` → `mlp.linear_fc1` → GELU (tanh) → `mlp.linear_fc2` → residual] → `merger`
//! (LayerNorm per patch, 2×2 patches concatenated, `linear_fc1` → GELU (erf) →
//! `linear_fc2`): one `out_hidden_size` embedding per image token. After each block listed
//! in `deepstack_visual_indexes`, a DeepStack merger (the 2×2 concatenation first, then its
//! LayerNorm) makes the features the language model adds to its hidden states at the image
//! positions after its first decoder layers ([`crate::VisualTokens`]).
//!
//! # Hookable Linears
//!
//! Names as ModelOpt names the modules of the whole model ([`VisionModel::linear_names`]:
//! `model.visual.patch_embed.proj`, `model.visual.blocks.{i}.attn.qkv`, …), in module
//! order. A [`LinearTap`] sees each call with its input `x: [rows, in]`, the weight
//! `[out, in]` (the Conv3d's flattened) and `y = x·wᵀ` *without the bias*, and may replace
//! `y`; the bias is added after.
//!
//! # Backward
//!
//! [`VisionModel::backward`] takes dL/d(merger output) and dL/d(each DeepStack feature)
//! — what the language model's backward hands out at the image positions — and returns
//! dL/dy for every Linear through `sink`, block by block from the last, recomputing what
//! the forward did not keep with the forward's own kernels (so the sink sees the bits a
//! tap saw). Images are independent in the tower (attention stays within a frame; norms
//! and Linears are per row), so callers run forward and backward over a few images at a
//! time to bound memory ([`VisionModel::cache_bytes`]).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde_json::{Map, Value};

use crate::{bmm_n, bmm_t, bmm_tn, matmul_xw, matmul_xwt, LinearTap};

/// Prefix of the vision tower inside a Qwen3-VL checkpoint (and ModelOpt's module names).
pub const VISUAL_PREFIX: &str = "model.visual.";

/// The activation of the blocks' MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `gelu_pytorch_tanh`.
    GeluTanh,
    /// `gelu` (erf).
    GeluErf,
}

/// Hyper-parameters of the vision tower, and the image token ids of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    pub deepstack_visual_indexes: Vec<usize>,
    pub hidden_act: Act,
    pub rope_theta: f64,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Value> {
    obj.get(key).with_context(|| format!("missing field `vision_config.{key}`"))
}

fn get_usize(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    let v = get(obj, key)?;
    v.as_u64().map(|n| n as usize).with_context(|| format!("field `vision_config.{key}` must be an integer, found {v}"))
}

fn root_id(root: &Map<String, Value>, key: &str) -> Result<u32> {
    let v = root.get(key).with_context(|| format!("missing field `{key}` (the image token ids of the checkpoint)"))?;
    v.as_u64().map(|n| n as u32).with_context(|| format!("field `{key}` must be an integer, found {v}"))
}

impl VisionConfig {
    /// The vision tower of `dir/config.json`; `None` when it has no `vision_config`.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let root: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_value(&root).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_value(root: &Value) -> Result<Option<Self>> {
        let Some(root) = root.as_object() else { bail!("config.json must be an object") };
        let Some(vc) = root.get("vision_config") else { return Ok(None) };
        let vc = vc.as_object().context("field `vision_config` must be an object")?;
        let hidden_act = match vc.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu_pytorch_tanh") {
            "gelu_pytorch_tanh" | "gelu_new" => Act::GeluTanh,
            "gelu" => Act::GeluErf,
            other => bail!("field `vision_config.hidden_act` is {other:?}; supported: \"gelu_pytorch_tanh\", \"gelu\""),
        };
        let rope_theta = match vc.get("rope_parameters").and_then(Value::as_object) {
            Some(rp) => rp.get("rope_theta").and_then(Value::as_f64).unwrap_or(10000.0),
            None => vc.get("rope_theta").and_then(Value::as_f64).unwrap_or(10000.0),
        };
        let deepstack = match vc.get("deepstack_visual_indexes") {
            Some(v) => serde_json::from_value::<Vec<usize>>(v.clone()).with_context(|| {
                format!("field `vision_config.deepstack_visual_indexes` must be integers, found {v}")
            })?,
            None => Vec::new(),
        };
        let cfg = VisionConfig {
            depth: get_usize(vc, "depth")?,
            hidden_size: get_usize(vc, "hidden_size")?,
            intermediate_size: get_usize(vc, "intermediate_size")?,
            num_heads: get_usize(vc, "num_heads")?,
            in_channels: vc.get("in_channels").and_then(Value::as_u64).unwrap_or(3) as usize,
            patch_size: get_usize(vc, "patch_size")?,
            temporal_patch_size: vc.get("temporal_patch_size").and_then(Value::as_u64).unwrap_or(2) as usize,
            spatial_merge_size: vc.get("spatial_merge_size").and_then(Value::as_u64).unwrap_or(2) as usize,
            out_hidden_size: get_usize(vc, "out_hidden_size")?,
            num_position_embeddings: get_usize(vc, "num_position_embeddings")?,
            deepstack_visual_indexes: deepstack,
            hidden_act,
            rope_theta,
            image_token_id: root_id(root, "image_token_id")?,
            vision_start_token_id: root_id(root, "vision_start_token_id")?,
            vision_end_token_id: root_id(root, "vision_end_token_id")?,
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.num_heads > 0 && self.hidden_size.is_multiple_of(self.num_heads),
            "vision_config: hidden_size {} is not a multiple of num_heads {}",
            self.hidden_size,
            self.num_heads
        );
        ensure!(
            self.head_dim().is_multiple_of(4),
            "vision_config: the head dim {} must be a multiple of 4 (2-D rotary)",
            self.head_dim()
        );
        let side = (self.num_position_embeddings as f64).sqrt() as usize;
        ensure!(
            side * side == self.num_position_embeddings,
            "vision_config.num_position_embeddings {} is not a square",
            self.num_position_embeddings
        );
        for &i in &self.deepstack_visual_indexes {
            ensure!(
                i < self.depth,
                "vision_config.deepstack_visual_indexes names block {i}, but depth is {}",
                self.depth
            );
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per patch row of `pixel_values`: `C·T·p·p`.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one image token.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// The width the mergers see: `hidden · merge²`.
    pub fn merged_hidden(&self) -> usize {
        self.hidden_size * self.merge_unit()
    }
}

/// What each hookable Linear of the tower is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionLinear {
    Patch,
    Qkv(usize),
    Proj(usize),
    Fc1(usize),
    Fc2(usize),
    MergerFc1,
    MergerFc2,
    DeepstackFc1(usize),
    DeepstackFc2(usize),
}

impl VisionLinear {
    pub fn name(self) -> String {
        let p = VISUAL_PREFIX;
        match self {
            VisionLinear::Patch => format!("{p}patch_embed.proj"),
            VisionLinear::Qkv(i) => format!("{p}blocks.{i}.attn.qkv"),
            VisionLinear::Proj(i) => format!("{p}blocks.{i}.attn.proj"),
            VisionLinear::Fc1(i) => format!("{p}blocks.{i}.mlp.linear_fc1"),
            VisionLinear::Fc2(i) => format!("{p}blocks.{i}.mlp.linear_fc2"),
            VisionLinear::MergerFc1 => format!("{p}merger.linear_fc1"),
            VisionLinear::MergerFc2 => format!("{p}merger.linear_fc2"),
            VisionLinear::DeepstackFc1(j) => format!("{p}deepstack_merger_list.{j}.linear_fc1"),
            VisionLinear::DeepstackFc2(j) => format!("{p}deepstack_merger_list.{j}.linear_fc2"),
        }
    }
}

/// Every hookable Linear of the tower in module order (ModelOpt's `named_modules`).
pub fn vision_linears(cfg: &VisionConfig) -> Vec<VisionLinear> {
    let mut v = vec![VisionLinear::Patch];
    for i in 0..cfg.depth {
        v.extend([VisionLinear::Qkv(i), VisionLinear::Proj(i), VisionLinear::Fc1(i), VisionLinear::Fc2(i)]);
    }
    v.extend([VisionLinear::MergerFc1, VisionLinear::MergerFc2]);
    for j in 0..cfg.deepstack_visual_indexes.len() {
        v.extend([VisionLinear::DeepstackFc1(j), VisionLinear::DeepstackFc2(j)]);
    }
    v
}

/// A Linear's weight `[out, in]` and bias `[out]`.
#[derive(Debug, Clone)]
pub struct LinearW {
    pub w: Tensor,
    pub b: Tensor,
}

/// A LayerNorm's weight and bias.
#[derive(Debug, Clone)]
pub struct NormW {
    pub w: Tensor,
    pub b: Tensor,
}

#[derive(Debug, Clone)]
pub struct BlockW {
    pub norm1: NormW,
    pub qkv: LinearW,
    pub proj: LinearW,
    pub norm2: NormW,
    pub fc1: LinearW,
    pub fc2: LinearW,
}

#[derive(Debug, Clone)]
pub struct MergerW {
    pub norm: NormW,
    pub fc1: LinearW,
    pub fc2: LinearW,
}

/// Every tensor of the tower. Linear weights as the language model holds them (a
/// half-precision checkpoint's stay as stored in an f32 model); the Conv3d's weight
/// flattened to `[hidden, C·T·p·p]`.
#[derive(Debug, Clone)]
pub struct VisionWeights {
    pub patch: LinearW,
    pub pos_embed: Tensor,
    pub blocks: Vec<BlockW>,
    pub merger: MergerW,
    pub deepstack: Vec<MergerW>,
}

impl VisionWeights {
    pub fn load(dir: &Path, cfg: &VisionConfig, dtype: DType, device: &Device) -> Result<Self> {
        let files = crate::weights::checkpoint_files(dir)?;
        let r = crate::weights::Reader::open(dir, &files, dtype, device)?;
        let p = VISUAL_PREFIX;
        let (h, i, m) = (cfg.hidden_size, cfg.intermediate_size, cfg.merged_hidden());
        let lin = |name: &str, out: usize, inp: usize| -> Result<LinearW> {
            Ok(LinearW {
                w: r.load_matrix(&format!("{p}{name}.weight"), &[out, inp])?,
                b: r.load(&format!("{p}{name}.bias"), &[out])?,
            })
        };
        let norm = |name: &str, n: usize| -> Result<NormW> {
            Ok(NormW { w: r.load(&format!("{p}{name}.weight"), &[n])?, b: r.load(&format!("{p}{name}.bias"), &[n])? })
        };
        let (c, t, ps) = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size);
        let patch = LinearW {
            w: r.load_matrix(&format!("{p}patch_embed.proj.weight"), &[h, c, t, ps, ps])?
                .reshape((h, cfg.patch_dim()))?,
            b: r.load(&format!("{p}patch_embed.proj.bias"), &[h])?,
        };
        let pos_embed = r.load(&format!("{p}pos_embed.weight"), &[cfg.num_position_embeddings, h])?;
        let blocks = (0..cfg.depth)
            .map(|k| {
                Ok(BlockW {
                    norm1: norm(&format!("blocks.{k}.norm1"), h)?,
                    qkv: lin(&format!("blocks.{k}.attn.qkv"), 3 * h, h)?,
                    proj: lin(&format!("blocks.{k}.attn.proj"), h, h)?,
                    norm2: norm(&format!("blocks.{k}.norm2"), h)?,
                    fc1: lin(&format!("blocks.{k}.mlp.linear_fc1"), i, h)?,
                    fc2: lin(&format!("blocks.{k}.mlp.linear_fc2"), h, i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merger = MergerW {
            norm: norm("merger.norm", h)?,
            fc1: lin("merger.linear_fc1", m, m)?,
            fc2: lin("merger.linear_fc2", cfg.out_hidden_size, m)?,
        };
        let deepstack = (0..cfg.deepstack_visual_indexes.len())
            .map(|j| {
                Ok(MergerW {
                    norm: norm(&format!("deepstack_merger_list.{j}.norm"), m)?,
                    fc1: lin(&format!("deepstack_merger_list.{j}.linear_fc1"), m, m)?,
                    fc2: lin(&format!("deepstack_merger_list.{j}.linear_fc2"), cfg.out_hidden_size, m)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionWeights { patch, pos_embed, blocks, merger, deepstack })
    }

    /// Bytes the weights hold, as stored.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let lin = |l: &LinearW| size(&l.w) + size(&l.b);
        let norm = |n: &NormW| size(&n.w) + size(&n.b);
        let merger = |m: &MergerW| norm(&m.norm) + lin(&m.fc1) + lin(&m.fc2);
        lin(&self.patch)
            + size(&self.pos_embed)
            + self
                .blocks
                .iter()
                .map(|b| norm(&b.norm1) + lin(&b.qkv) + lin(&b.proj) + norm(&b.norm2) + lin(&b.fc1) + lin(&b.fc2))
                .sum::<u64>()
            + merger(&self.merger)
            + self.deepstack.iter().map(merger).sum::<u64>()
    }
}

/// Images of one forward: their patch rows and grids.
#[derive(Debug, Clone)]
pub struct Images {
    /// `[P, C·T·p·p]`, the images' patch rows one image after another.
    pub pixel_values: Tensor,
    /// `(t, h, w)` patch grid per image (`t·h·w` rows each).
    pub grid_thw: Vec<[usize; 3]>,
}

impl Images {
    pub fn new(pixel_values: Tensor, grid_thw: Vec<[usize; 3]>) -> Result<Self> {
        let rows: usize = grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum();
        ensure!(
            pixel_values.dim(0)? == rows,
            "pixel_values has {} rows, the grids {rows} patches",
            pixel_values.dim(0)?
        );
        Ok(Images { pixel_values, grid_thw })
    }

    /// The images `range` (their rows of `pixel_values`).
    pub fn select(&self, range: std::ops::Range<usize>) -> Result<Images> {
        let start: usize = self.grid_thw[..range.start].iter().map(|g| g[0] * g[1] * g[2]).sum();
        let len: usize = self.grid_thw[range.clone()].iter().map(|g| g[0] * g[1] * g[2]).sum();
        Ok(Images { pixel_values: self.pixel_values.narrow(0, start, len)?, grid_thw: self.grid_thw[range].to_vec() })
    }

    pub fn patches(&self) -> usize {
        self.grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum()
    }
}

/// The tower's outputs for a set of images, in the language model's width.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// `[P / merge², out_hidden]`: one embedding per image token.
    pub embeds: Tensor,
    /// Per DeepStack merger, `[P / merge², out_hidden]`.
    pub deepstack: Vec<Tensor>,
}

/// Per-forward tables shared by the blocks.
#[derive(Clone)]
struct Ctx {
    cos: Tensor,
    sin: Tensor,
    /// Rows of each attention segment (one image frame each).
    segments: Vec<(usize, usize)>,
}

/// A block's activations kept for the backward (pre-bias Linear outputs as the tap saw).
#[derive(Clone)]
struct BlockActs {
    x: Tensor,
    qkv0: Tensor,
    o: Tensor,
    proj0: Tensor,
    h_mid: Tensor,
    fc1_0: Tensor,
    fc2_0: Tensor,
}

#[derive(Clone)]
struct MergerActs {
    /// The merger's input `[P, hidden]` (a block's output).
    x: Tensor,
    fc1_0: Tensor,
    fc2_0: Tensor,
}

/// A forward that keeps what [`VisionModel::backward`] needs.
#[derive(Clone)]
pub struct VisionCache {
    pixel_values: Tensor,
    patch0: Tensor,
    ctx: Ctx,
    blocks: Vec<BlockActs>,
    merger: MergerActs,
    deepstack: Vec<MergerActs>,
}

/// The Qwen3-VL vision tower.
pub struct VisionModel {
    cfg: VisionConfig,
    w: VisionWeights,
    linears: Vec<VisionLinear>,
    names: Vec<String>,
    dtype: DType,
    device: Device,
}

impl VisionModel {
    pub fn load_with(dir: &Path, cfg: VisionConfig, dtype: DType, device: &Device) -> Result<Self> {
        let w = VisionWeights::load(dir, &cfg, dtype, device)
            .with_context(|| format!("loading the vision tower of {}", dir.display()))?;
        Ok(Self::from_parts(cfg, w, dtype, device))
    }

    pub fn from_parts(cfg: VisionConfig, w: VisionWeights, dtype: DType, device: &Device) -> Self {
        let linears = vision_linears(&cfg);
        let names = linears.iter().map(|l| l.name()).collect();
        VisionModel { cfg, w, linears, names, dtype, device: device.clone() }
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &VisionWeights {
        &self.w
    }

    /// Hookable Linear names in module order.
    pub fn linear_names(&self) -> &[String] {
        &self.names
    }

    pub fn linear_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn lin(&self, l: VisionLinear) -> &LinearW {
        let w = &self.w;
        match l {
            VisionLinear::Patch => &w.patch,
            VisionLinear::Qkv(i) => &w.blocks[i].qkv,
            VisionLinear::Proj(i) => &w.blocks[i].proj,
            VisionLinear::Fc1(i) => &w.blocks[i].fc1,
            VisionLinear::Fc2(i) => &w.blocks[i].fc2,
            VisionLinear::MergerFc1 => &w.merger.fc1,
            VisionLinear::MergerFc2 => &w.merger.fc2,
            VisionLinear::DeepstackFc1(j) => &w.deepstack[j].fc1,
            VisionLinear::DeepstackFc2(j) => &w.deepstack[j].fc2,
        }
    }

    /// `[out, in]` weight of Linear `idx` (module order).
    pub fn linear_weight(&self, idx: usize) -> &Tensor {
        &self.lin(self.linears[idx]).w
    }

    fn index_of(&self, l: VisionLinear) -> usize {
        self.linears.iter().position(|&x| x == l).expect("every linear is listed")
    }

    /// `y0 = x·wᵀ` (seen and maybe replaced by the tap), then `+ b`. Returns `(y0, y)`.
    fn linear(&self, l: VisionLinear, x: &Tensor, tap: &mut dyn LinearTap) -> Result<(Tensor, Tensor)> {
        let lw = self.lin(l);
        let idx = self.index_of(l);
        let y0 = matmul_xwt(x, &lw.w)?;
        let name = &self.names[idx];
        let y0 = match tap.on_linear(idx, name, x, &lw.w, &y0).with_context(|| format!("tap on {name}"))? {
            None => y0,
            Some(y2) => {
                ensure!(
                    y2.dims() == y0.dims(),
                    "tap on {name} replaced output of shape {:?} with {:?}",
                    y0.dims(),
                    y2.dims()
                );
                y2
            }
        };
        let y = y0.broadcast_add(&lw.b)?;
        Ok((y0, y))
    }

    fn ctx(&self, images: &Images) -> Result<Ctx> {
        let (cos, sin) = self.rotary_tables(&images.grid_thw)?;
        let mut segments = Vec::new();
        let mut start = 0;
        for g in &images.grid_thw {
            for _ in 0..g[0] {
                segments.push((start, g[1] * g[2]));
                start += g[1] * g[2];
            }
        }
        Ok(Ctx { cos, sin, segments })
    }

    /// The patch rows' `(h, w)` positions in spatial-merge-block order, repeated per frame.
    fn patch_positions(&self, grid_thw: &[[usize; 3]]) -> Vec<(usize, usize)> {
        let m = self.cfg.spatial_merge_size;
        let mut pos = Vec::new();
        for &[t, h, w] in grid_thw {
            let mut frame = Vec::with_capacity(h * w);
            for br in 0..h / m {
                for bc in 0..w / m {
                    for ir in 0..m {
                        for ic in 0..m {
                            frame.push((br * m + ir, bc * m + ic));
                        }
                    }
                }
            }
            for _ in 0..t {
                pos.extend_from_slice(&frame);
            }
        }
        pos
    }

    /// 2-D rotary tables `[P, head_dim/2]`: the first half of each row from the patch's
    /// row position, the second from its column, frequencies `1/θ^(2i/(head_dim/2))`,
    /// computed in f32 as transformers does (f64 in an f64 model).
    fn rotary_tables(&self, grid_thw: &[[usize; 3]]) -> Result<(Tensor, Tensor)> {
        let dim = self.cfg.head_dim() / 2;
        let pos = self.patch_positions(grid_thw);
        let n = pos.len();
        let theta = self.cfg.rope_theta;
        if self.dtype == DType::F64 {
            let inv: Vec<f64> = (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64)).collect();
            let mut cos = Vec::with_capacity(n * dim);
            let mut sin = Vec::with_capacity(n * dim);
            for &(h, w) in &pos {
                for p in [h, w] {
                    for f in &inv {
                        let a = p as f64 * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
            return Ok((
                Tensor::from_vec(cos, (n, dim), &self.device)?,
                Tensor::from_vec(sin, (n, dim), &self.device)?,
            ));
        }
        let base = theta as f32;
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32)).collect();
        let mut cos = Vec::with_capacity(n * dim);
        let mut sin = Vec::with_capacity(n * dim);
        for &(h, w) in &pos {
            for p in [h, w] {
                for f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (n, dim), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (n, dim), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// The learned position embedding resampled to each image's grid `[P, hidden]`:
    /// bilinear with `align_corners=True`, taps and weights in f32 as transformers
    /// computes them (in f64 in an f64 model), the four weighted taps summed in order.
    fn position_embedding(&self, grid_thw: &[[usize; 3]]) -> Result<Tensor> {
        let side = (self.cfg.num_position_embeddings as f64).sqrt() as usize;
        let wide = self.dtype == DType::F64;
        let taps = |index: usize, size: usize| -> [(usize, f64); 2] {
            let (src, fl) = if wide {
                let src = index as f64 * (side - 1) as f64 / (size.max(2) - 1) as f64;
                (src, src.floor())
            } else {
                let src = index as f32 * (side - 1) as f32 / (size.max(2) - 1) as f32;
                (src as f64, src.floor() as f64)
            };
            let mut out = [(0usize, 0f64); 2];
            for (k, o) in out.iter_mut().enumerate() {
                let raw = fl as i64 + k as i64;
                let tap = raw.clamp(0, side as i64 - 1) as usize;
                let weight = if wide {
                    (1.0 - (src - fl - k as f64).abs()).max(0.0)
                } else {
                    (1.0f32 - (src as f32 - fl as f32 - k as f32).abs()).max(0.0) as f64
                };
                *o = (tap, weight);
            }
            out
        };
        let pos = self.patch_positions(grid_thw);
        let mut sizes = Vec::with_capacity(pos.len());
        for &[t, h, w] in grid_thw {
            sizes.extend(std::iter::repeat_n((h, w), t * h * w));
        }
        let mut idx = [Vec::with_capacity(pos.len()), Vec::new(), Vec::new(), Vec::new()];
        let mut wts = [Vec::with_capacity(pos.len()), Vec::new(), Vec::new(), Vec::new()];
        for (&(r, c), &(h, w)) in pos.iter().zip(&sizes) {
            let (th, tw) = (taps(r, h), taps(c, w));
            for a in 0..2 {
                for b in 0..2 {
                    idx[a * 2 + b].push((th[a].0 * side + tw[b].0) as u32);
                    // the outer product in the weights' precision
                    wts[a * 2 + b].push(if wide {
                        th[a].1 * tw[b].1
                    } else {
                        (th[a].1 as f32 * tw[b].1 as f32) as f64
                    });
                }
            }
        }
        let n = pos.len();
        let mut acc: Option<Tensor> = None;
        for k in 0..4 {
            let ids = Tensor::from_vec(std::mem::take(&mut idx[k]), n, &self.device)?;
            let wk = Tensor::from_vec(std::mem::take(&mut wts[k]), (n, 1), &self.device)?.to_dtype(self.dtype)?;
            // (f32 weights are exact in f64, so the cast back to an f32 model is exact too)
            let term = self.w.pos_embed.index_select(&ids, 0)?.broadcast_mul(&wk)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc.expect("four taps"))
    }

    /// Embeddings and DeepStack features of `images` (nothing kept).
    pub fn forward(&self, images: &Images, tap: &mut dyn LinearTap) -> Result<VisionOutput> {
        Ok(self.run(images, tap, false)?.0)
    }

    /// [`Self::forward`] keeping what [`Self::backward`] needs.
    pub fn forward_for_backward(
        &self,
        images: &Images,
        tap: &mut dyn LinearTap,
    ) -> Result<(VisionOutput, VisionCache)> {
        let (out, cache) = self.run(images, tap, true)?;
        Ok((out, cache.expect("kept")))
    }

    /// Bytes a [`VisionCache`] of `patches` rows holds (per block `P·(8H + I)` values,
    /// plus the mergers' and the rotary tables).
    pub fn cache_bytes(&self, patches: usize) -> u64 {
        let c = &self.cfg;
        let (h, i, m) = (c.hidden_size as u64, c.intermediate_size as u64, c.merged_hidden() as u64);
        let p = patches as u64;
        let per_block = p * (8 * h + i);
        let mergers = (1 + c.deepstack_visual_indexes.len() as u64)
            * (p * h + p / c.merge_unit() as u64 * (m + c.out_hidden_size as u64));
        (c.depth as u64 * per_block + mergers + p * (c.patch_dim() as u64 + h + c.head_dim() as u64))
            * self.dtype.size_in_bytes() as u64
    }

    fn run(&self, images: &Images, tap: &mut dyn LinearTap, keep: bool) -> Result<(VisionOutput, Option<VisionCache>)> {
        let c = &self.cfg;
        ensure!(
            images.pixel_values.dims() == [images.patches(), c.patch_dim()],
            "pixel_values has shape {:?}; the vision tower takes [{}, {}] for these grids",
            images.pixel_values.dims(),
            images.patches(),
            c.patch_dim()
        );
        for g in &images.grid_thw {
            ensure!(
                g[1] % c.spatial_merge_size == 0 && g[2] % c.spatial_merge_size == 0,
                "an image grid {g:?} is not a multiple of spatial_merge_size {}",
                c.spatial_merge_size
            );
        }
        let ctx = self.ctx(images)?;
        let px = images.pixel_values.to_dtype(self.dtype)?.to_device(&self.device)?;
        let (patch0, patch) = self.linear(VisionLinear::Patch, &px, tap)?;
        let mut h = (patch + self.position_embedding(&images.grid_thw)?)?;
        let mut blocks = Vec::new();
        let mut ds_out = vec![None; c.deepstack_visual_indexes.len()];
        let mut ds_acts = vec![None; c.deepstack_visual_indexes.len()];
        for i in 0..c.depth {
            let (out, acts) = self.block_forward(i, &h, &ctx, tap)?;
            if keep {
                blocks.push(acts);
            }
            h = out;
            for (j, _) in c.deepstack_visual_indexes.iter().enumerate().filter(|(_, &b)| b == i) {
                let (y, a) = self.merger_forward(Some(j), &h, tap)?;
                ds_out[j] = Some(y);
                ds_acts[j] = Some(a);
            }
        }
        let (embeds, merger) = self.merger_forward(None, &h, tap)?;
        let deepstack: Vec<Tensor> = ds_out.into_iter().map(|t| t.expect("every DeepStack merger ran")).collect();
        let cache = keep.then(|| VisionCache {
            pixel_values: px,
            patch0,
            ctx,
            blocks,
            merger,
            deepstack: ds_acts.into_iter().map(|a| a.expect("every DeepStack merger ran")).collect(),
        });
        Ok((VisionOutput { embeds, deepstack }, cache))
    }

    fn block_forward(&self, i: usize, x: &Tensor, ctx: &Ctx, tap: &mut dyn LinearTap) -> Result<(Tensor, BlockActs)> {
        let bw = &self.w.blocks[i];
        let n1 = layer_norm(x, &bw.norm1)?;
        let (qkv0, qkv) = self.linear(VisionLinear::Qkv(i), &n1, tap)?;
        let (q, k, v) = self.split_qkv(&qkv, ctx)?;
        let mut outs = Vec::with_capacity(ctx.segments.len());
        for &(s, len) in &ctx.segments {
            let p = self.attention_probs(&q.narrow(2, s, len)?, &k.narrow(2, s, len)?)?;
            outs.push(bmm_n(&p, &v.narrow(2, s, len)?.contiguous()?)?);
        }
        let o = self.merge_heads(&Tensor::cat(&outs, 2)?)?;
        let (proj0, proj) = self.linear(VisionLinear::Proj(i), &o, tap)?;
        let h_mid = (x + proj)?;
        let n2 = layer_norm(&h_mid, &bw.norm2)?;
        let (fc1_0, fc1) = self.linear(VisionLinear::Fc1(i), &n2, tap)?;
        let a = act(&fc1, self.cfg.hidden_act)?;
        let (fc2_0, fc2) = self.linear(VisionLinear::Fc2(i), &a, tap)?;
        let out = (&h_mid + fc2)?;
        Ok((out, BlockActs { x: x.clone(), qkv0, o, proj0, h_mid, fc1_0, fc2_0 }))
    }

    /// `[P, 3H]` → rotated q, k and v, each `[1, heads, P, hd]`.
    fn split_qkv(&self, qkv: &Tensor, ctx: &Ctx) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (p, heads, hd) = (qkv.dim(0)?, c.num_heads, c.head_dim());
        let qkv = qkv.reshape((p, 3, heads, hd))?.permute((1, 2, 0, 3))?; // [3, heads, P, hd]
        let part = |k: usize| -> Result<Tensor> { Ok(qkv.get(k)?.unsqueeze(0)?.contiguous()?) };
        let q = crate::ops::rope(&part(0)?, &ctx.cos, &ctx.sin)?;
        let k = crate::ops::rope(&part(1)?, &ctx.cos, &ctx.sin)?;
        Ok((q, k, part(2)?))
    }

    /// `[1, heads, P, hd]` → `[P, H]`.
    fn merge_heads(&self, o: &Tensor) -> Result<Tensor> {
        let p = o.dim(2)?;
        Ok(o.squeeze(0)?.transpose(0, 1)?.contiguous()?.reshape((p, self.cfg.hidden_size))?)
    }

    fn attention_probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / (self.cfg.head_dim() as f64).sqrt();
        let s = (bmm_t(&q.contiguous()?, &k.contiguous()?)? * scale)?;
        crate::ops::softmax_last_dim(&s)
    }

    fn merger_weights(&self, j: Option<usize>) -> &MergerW {
        match j {
            Some(j) => &self.w.deepstack[j],
            None => &self.w.merger,
        }
    }

    fn merger_linears(j: Option<usize>) -> (VisionLinear, VisionLinear) {
        match j {
            Some(j) => (VisionLinear::DeepstackFc1(j), VisionLinear::DeepstackFc2(j)),
            None => (VisionLinear::MergerFc1, VisionLinear::MergerFc2),
        }
    }

    /// The merger (`None`) or DeepStack merger `j` on a block's output `x: [P, H]`.
    fn merger_forward(&self, j: Option<usize>, x: &Tensor, tap: &mut dyn LinearTap) -> Result<(Tensor, MergerActs)> {
        let n = self.merger_norm(j, x)?;
        let (l1, l2) = Self::merger_linears(j);
        let (fc1_0, fc1) = self.linear(l1, &n, tap)?;
        let a = act(&fc1, Act::GeluErf)?;
        let (fc2_0, fc2) = self.linear(l2, &a, tap)?;
        Ok((fc2, MergerActs { x: x.clone(), fc1_0, fc2_0 }))
    }

    /// The merger's normalized, merged input `[P/merge², H·merge²]`.
    fn merger_norm(&self, j: Option<usize>, x: &Tensor) -> Result<Tensor> {
        let m = self.cfg.merged_hidden();
        let rows = x.dim(0)? / self.cfg.merge_unit();
        let nw = &self.merger_weights(j).norm;
        Ok(match j {
            Some(_) => layer_norm(&x.reshape((rows, m))?, nw)?,
            None => layer_norm(x, nw)?.reshape((rows, m))?,
        })
    }

    /// Backward of a merger: dL/dx `[P, H]` from dL/d(its output); the sink sees fc2 and fc1.
    fn merger_backward(
        &self,
        j: Option<usize>,
        a: &MergerActs,
        dy: &Tensor,
        sink: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let mw = self.merger_weights(j);
        let (l1, l2) = Self::merger_linears(j);
        let n = self.merger_norm(j, &a.x)?;
        let fc1 = a.fc1_0.broadcast_add(&mw.fc1.b)?;
        let act_out = act(&fc1, Act::GeluErf)?;
        sink(self.index_of(l2), &act_out, &a.fc2_0, dy)?;
        let d_act = matmul_xw(dy, &mw.fc2.w)?;
        let d_fc1 = (d_act * act_grad(&fc1, Act::GeluErf)?)?;
        sink(self.index_of(l1), &n, &a.fc1_0, &d_fc1)?;
        let dn = matmul_xw(&d_fc1, &mw.fc1.w)?;
        let (p, h) = a.x.dims2()?;
        Ok(match j {
            Some(_) => {
                let xm = a.x.reshape((p / self.cfg.merge_unit(), self.cfg.merged_hidden()))?;
                layer_norm_backward(&xm, &mw.norm, &dn)?.reshape((p, h))?
            }
            None => layer_norm_backward(&a.x, &mw.norm, &dn.reshape((p, h))?)?,
        })
    }

    /// dL/dy of every Linear of the forward in `cache`, given dL/d(embeds) and dL/d(each
    /// DeepStack feature) (`[P/merge², out_hidden]` each). `sink(idx, x, y0, dy)` sees
    /// each Linear with its input, its output without bias (as the forward's tap saw them)
    /// and dL/dy; the cache is consumed block by block.
    pub fn backward(
        &self,
        cache: VisionCache,
        d_embeds: &Tensor,
        d_deepstack: &[Tensor],
        sink: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let c = &self.cfg;
        ensure!(
            d_deepstack.len() == c.deepstack_visual_indexes.len(),
            "{} DeepStack gradients for {} mergers",
            d_deepstack.len(),
            c.deepstack_visual_indexes.len()
        );
        let VisionCache { pixel_values, patch0, ctx, mut blocks, merger, deepstack } = cache;
        let mut dh = self.merger_backward(None, &merger, d_embeds, sink)?;
        drop(merger);
        let neg_sin = ctx.sin.neg()?;
        while let Some(a) = blocks.pop() {
            let i = blocks.len();
            for (j, _) in c.deepstack_visual_indexes.iter().enumerate().filter(|(_, &b)| b == i) {
                dh = (dh + self.merger_backward(Some(j), &deepstack[j], &d_deepstack[j], sink)?)?;
            }
            dh = self.block_backward(i, a, &ctx, &neg_sin, &dh, sink)?;
        }
        sink(self.index_of(VisionLinear::Patch), &pixel_values, &patch0, &dh)
    }

    /// One block's backward: dL/d(its input) from dL/d(its output).
    fn block_backward(
        &self,
        i: usize,
        a: BlockActs,
        ctx: &Ctx,
        neg_sin: &Tensor,
        dh: &Tensor,
        sink: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let bw = &self.w.blocks[i];
        // MLP: out = h_mid + fc2(act(fc1(norm2(h_mid))))
        let n2 = layer_norm(&a.h_mid, &bw.norm2)?;
        let fc1 = a.fc1_0.broadcast_add(&bw.fc1.b)?;
        let act_out = act(&fc1, c.hidden_act)?;
        sink(self.index_of(VisionLinear::Fc2(i)), &act_out, &a.fc2_0, dh)?;
        let d_act = matmul_xw(dh, &bw.fc2.w)?;
        let d_fc1 = (d_act * act_grad(&fc1, c.hidden_act)?)?;
        sink(self.index_of(VisionLinear::Fc1(i)), &n2, &a.fc1_0, &d_fc1)?;
        let dn2 = matmul_xw(&d_fc1, &bw.fc1.w)?;
        let dh_mid = (dh + layer_norm_backward(&a.h_mid, &bw.norm2, &dn2)?)?;
        // attention: h_mid = x + proj(attn(norm1(x)))
        sink(self.index_of(VisionLinear::Proj(i)), &a.o, &a.proj0, &dh_mid)?;
        let d_o = matmul_xw(&dh_mid, &bw.proj.w)?;
        let (p_rows, heads, hd) = (d_o.dim(0)?, c.num_heads, c.head_dim());
        let d_o = d_o.reshape((p_rows, heads, hd))?.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
        let qkv = a.qkv0.broadcast_add(&bw.qkv.b)?;
        let (q, k, v) = self.split_qkv(&qkv, ctx)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for &(s, len) in &ctx.segments {
            let (qs, ks, vs) = (
                q.narrow(2, s, len)?.contiguous()?,
                k.narrow(2, s, len)?.contiguous()?,
                v.narrow(2, s, len)?.contiguous()?,
            );
            let dos = d_o.narrow(2, s, len)?.contiguous()?;
            let p = self.attention_probs(&qs, &ks)?;
            dvs.push(bmm_tn(&p, &dos)?);
            let dp = bmm_t(&dos, &vs)?;
            let ds = (crate::ops::softmax_backward(&p, &dp)? * scale)?;
            dqs.push(bmm_n(&ds, &ks)?);
            dks.push(bmm_tn(&ds, &qs)?);
        }
        let dq = crate::ops::rope_backward(&Tensor::cat(&dqs, 2)?, &ctx.cos, neg_sin)?;
        let dk = crate::ops::rope_backward(&Tensor::cat(&dks, 2)?, &ctx.cos, neg_sin)?;
        let dv = Tensor::cat(&dvs, 2)?;
        // [1, heads, P, hd] ×3 → [3, heads, P, hd] → [P, 3, heads, hd] → [P, 3H]
        let dqkv =
            Tensor::cat(&[dq, dk, dv], 0)?.permute((2, 0, 1, 3))?.contiguous()?.reshape((p_rows, 3 * c.hidden_size))?;
        let n1 = layer_norm(&a.x, &bw.norm1)?;
        sink(self.index_of(VisionLinear::Qkv(i)), &n1, &a.qkv0, &dqkv)?;
        let dn1 = matmul_xw(&dqkv, &bw.qkv.w)?;
        Ok((dh_mid + layer_norm_backward(&a.x, &bw.norm1, &dn1)?)?)
    }
}

/// LayerNorm over the last dim, eps 1e-6: `(x − mean)/sqrt(var + eps)·w + b`.
fn layer_norm(x: &Tensor, nw: &NormW) -> Result<Tensor> {
    let (xhat, _) = normalized(x)?;
    Ok(xhat.broadcast_mul(&nw.w)?.broadcast_add(&nw.b)?)
}

/// `(x̂, 1/σ)` of a LayerNorm over the last dim.
fn normalized(x: &Tensor) -> Result<(Tensor, Tensor)> {
    const EPS: f64 = 1e-6;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + EPS)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?, rstd))
}

/// Backward of [`layer_norm`]: `dx = (g − mean(g) − x̂·mean(g·x̂))/σ` with `g = dy·w`.
fn layer_norm_backward(x: &Tensor, nw: &NormW, dy: &Tensor) -> Result<Tensor> {
    let (xhat, rstd) = normalized(x)?;
    let g = dy.broadcast_mul(&nw.w)?;
    let mg = g.mean_keepdim(D::Minus1)?;
    let mgx = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    Ok(g.broadcast_sub(&mg)?.sub(&xhat.broadcast_mul(&mgx)?)?.broadcast_mul(&rstd)?)
}

fn act(x: &Tensor, a: Act) -> Result<Tensor> {
    Ok(match a {
        Act::GeluTanh => x.gelu()?,
        Act::GeluErf => x.gelu_erf()?,
    })
}

/// d act(x)/dx.
fn act_grad(x: &Tensor, a: Act) -> Result<Tensor> {
    Ok(match a {
        Act::GeluTanh => {
            // 0.5·(1 + t) + 0.5·x·(1 − t²)·c·(1 + 3·0.044715·x²), t = tanh(c·(x + 0.044715·x³))
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let x2 = x.sqr()?;
            let u = ((x * x2.affine(0.044715, 1.0)?)? * c)?;
            let t = u.tanh()?;
            let left = t.affine(0.5, 0.5)?;
            let right = ((x * t.sqr()?.affine(-1.0, 1.0)?)? * x2.affine(3.0 * 0.044715, 1.0)?)?;
            (left + (right * (0.5 * c))?)?
        }
        Act::GeluErf => {
            // Φ(x) + x·φ(x)
            let cdf = (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?.affine(0.5, 0.5)?;
            let pdf = (x.sqr()? * -0.5)?.exp()?.affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
            (cdf + (x * pdf)?)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn rand(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn act_grads_match_finite_differences() {
        // (candle's autograd of gelu uses rounded constants: not a reference to 1e-9.)
        let h = 1e-6;
        for a in [Act::GeluTanh, Act::GeluErf] {
            let x = rand(&[64], 3, 3.0);
            let up = act(&(&x + h).unwrap(), a).unwrap().to_vec1::<f64>().unwrap();
            let down = act(&(&x - h).unwrap(), a).unwrap().to_vec1::<f64>().unwrap();
            let ours = act_grad(&x, a).unwrap().to_vec1::<f64>().unwrap();
            for ((u, d), q) in up.iter().zip(&down).zip(&ours) {
                let fd = (u - d) / (2.0 * h);
                assert!((fd - q).abs() < 1e-8, "{a:?}: finite difference {fd} vs {q}");
            }
        }
    }

    #[test]
    fn layer_norm_backward_matches_autograd() {
        let nw = NormW { w: rand(&[16], 5, 1.0), b: rand(&[16], 6, 1.0) };
        let x = Var::from_tensor(&rand(&[5, 16], 7, 2.0)).unwrap();
        let dy = rand(&[5, 16], 8, 1.0);
        let y = (layer_norm(x.as_tensor(), &nw).unwrap() * &dy).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        let auto = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let ours =
            layer_norm_backward(x.as_tensor(), &nw, &dy).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (p, q) in auto.iter().zip(&ours) {
            assert!((p - q).abs() < 1e-10, "autograd {p} vs {q}");
        }
    }
}
