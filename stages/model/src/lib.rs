//! The Qwen3-VL language model in candle, with hookable Linears and a hand-written
//! backward pass that yields dL/dy of every Linear output.
//!
//! # Structure
//!
//! `embed_tokens` → per layer [`input_layernorm` (RMSNorm) → `self_attn` (q/k/v proj,
//! per-head `q_norm`/`k_norm` RMSNorm, RoPE, GQA causal attention, `o_proj`) → residual →
//! `post_attention_layernorm` → SwiGLU `mlp` (gate/up/down) → residual] → `norm` →
//! `lm_head` (tied to `embed_tokens` when `tie_word_embeddings` or `lm_head.weight` is
//! absent). Text-only input: position ids are `0..T-1` on all three MRoPE axes regardless
//! of padding, so MRoPE is plain RoPE (see [`ops::rope_tables`]). Padding is masked as
//! transformers 5.x does for the extracted language model called with `input_ids` and
//! `attention_mask`: keys that are pads are never attended; with [`AttnImpl::Sdpa`]
//! (transformers' default) a query row that sees no key at all (a left pad) gets attention
//! output 0, with [`AttnImpl::Eager`] it averages all values uniformly.
//!
//! # Hookable Linears
//!
//! Every Linear except `lm_head` has an index and a stable name ([`names`]):
//! `idx = layer*7 + k`, k over `q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
//! down_proj`; names `layers.{i}.self_attn.q_proj` … `layers.{i}.mlp.down_proj`.
//! [`TextModel::linear_names`], [`TextModel::linear_weight`] (`[out, in]`),
//! [`TextModel::linear_index`].
//!
//! A [`LinearTap`] sees every Linear call in module order with its input
//! `x: [N, in]` (N = B·T rows, batch-major), weight `w: [out, in]` and output
//! `y = x·wᵀ: [N, out]`, and may return a replacement output (e.g.
//! `fake_quant(x)·fake_quant(w)ᵀ`) that the rest of the forward then uses. Compute
//! replacements with [`matmul_xwt`] (the kernel the model uses), so an identity
//! replacement reproduces `y` exactly. A closure
//! `|idx, name, x, w, y| -> anyhow::Result<Option<Tensor>>` is a tap.
//!
//! # Gradients of Linear outputs
//!
//! candle's autograd drops the gradients of intermediate tensors and always computes
//! weight gradients, so the model has its own backward pass that computes activation
//! gradients only:
//!
//! ```ignore
//! let fw = model.forward_for_backward(&batch, &mut NoTap)?;      // keeps activations
//! let ce = loss::shifted_cross_entropy(fw.logits(), &batch.input_ids, Some(pad_id))?;
//! let dy: Vec<Tensor> = model.backward(&fw, &ce.dlogits)?;      // dL/dy per linear, [N, out]
//! ```
//!
//! or in one call [`TextModel::linear_output_grads`]. `dy[idx]` is dL/dy of linear `idx`
//! for the forward that was run (with whatever outputs the tap substituted); the backward
//! propagates through a Linear as `dx = dy·w` with its unquantized weight. Custom
//! losses: pass any dL/dlogits `[B, T, V]` to [`TextModel::backward`]. For KL scores use
//! [`loss::log_softmax`] on the logits of [`TextModel::forward`].
//!
//! # Cost
//!
//! Linears run on a packed GEMM ([`gemm`]: AVX-512, AVX2 or scalar kernels with the same
//! bits), element-wise parts on fused rayon kernels. A [`ForwardCache`] holds, per layer,
//! 4 bytes × N·(4·H + Hq·D + 2·Hkv·D + 2·I) (H hidden, I intermediate, Hq/Hkv heads,
//! D head_dim) plus logits ([`TextModel::forward_cache_bytes`]): ≈ 220 MB for hidden 512 /
//! 8 layers / 8×128 tokens. Attention probabilities are recomputed, not kept. Forward and
//! backward times against PyTorch's: `cargo test -p qpipe-model --lib tests::bench_midsize
//! -- --ignored --nocapture`.

pub mod config;
mod fused;
pub mod gemm;
pub mod loss;
pub mod memory;
pub mod names;
pub mod ops;
pub mod vision;
pub mod vl;
pub mod weights;

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

pub use config::{ConfigDialect, TextConfig};
pub use names::{linear_at, linear_index, linear_name, linear_names, LinearKind, LINEARS_PER_LAYER};
pub use weights::LmWeights;

use ops::AttnMasks;

/// How padded query rows that see no key are treated (the only place the attention
/// implementations of transformers differ for this model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnImpl {
    /// `torch.nn.functional.scaled_dot_product_attention` (transformers' default on CPU):
    /// fully-masked rows output 0.
    #[default]
    Sdpa,
    /// transformers' eager attention: the additive mask is `finfo.min`, so fully-masked
    /// rows softmax to uniform weights over all keys.
    Eager,
}

/// Observes (and optionally replaces) each Linear's output during a forward pass.
pub trait LinearTap {
    /// Called once per Linear in module order. `x: [N, in]`, `w: [out, in]`,
    /// `y = x·wᵀ: [N, out]`. Return `Some(y')` (same shape) to make the model continue
    /// with `y'`, `None` to keep `y`. Tensors are cheap to clone (reference-counted).
    fn on_linear(&mut self, idx: usize, name: &str, x: &Tensor, w: &Tensor, y: &Tensor) -> Result<Option<Tensor>>;
}

/// A tap that does nothing.
pub struct NoTap;

impl LinearTap for NoTap {
    fn on_linear(&mut self, _: usize, _: &str, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

impl<F> LinearTap for F
where
    F: FnMut(usize, &str, &Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>>,
{
    fn on_linear(&mut self, idx: usize, name: &str, x: &Tensor, w: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
        self(idx, name, x, w, y)
    }
}

/// A batch of token rows of equal length `T` (left padding expected but not required).
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B][T]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][T]`, 1 = token, 0 = pad.
    pub attention_mask: Vec<Vec<u32>>,
    /// The image tokens' embeddings, DeepStack features and M-RoPE positions, for a batch
    /// with images (the vision tower's output); `None` for text.
    pub visual: Option<VisualTokens>,
}

/// What the vision tower gives the language model for a batch with images (as
/// transformers' `Qwen3VLModel.forward` passes it): the embeddings that replace the image
/// tokens' (`masked_scatter`), the DeepStack features added to the residual stream at the
/// image positions after decoder layer `j` for the `j`-th feature, and the 3-D positions
/// of every token ([`rope_index`]).
#[derive(Debug, Clone)]
pub struct VisualTokens {
    /// Flat rows `b·T + t` of the image tokens, in order (the tower's output order).
    pub rows: Vec<u32>,
    /// `[M, H]`, M = `rows.len()`.
    pub embeds: Tensor,
    /// Each `[M, H]`.
    pub deepstack: Vec<Tensor>,
    /// `(t, h, w)` M-RoPE position of every token, each `[B·T]` (0 at pads).
    pub positions: [Vec<u32>; 3],
}

/// dL/d(the tower's outputs) at the image positions, from the language model's backward.
#[derive(Debug, Clone)]
pub struct VisualGrads {
    /// `[M, H]`: dL/d(the image tokens' input embeddings).
    pub embeds: Tensor,
    /// Per DeepStack feature `[M, H]`.
    pub deepstack: Vec<Tensor>,
}

/// transformers' `Qwen3VLModel.get_rope_index` for a batch whose images are each one run
/// of `image_token_id` tokens: per row, over its non-pad tokens, text runs count on from
/// the current position on all three axes; an image of patch grid `(t, h, w)` takes
/// positions `(start + t', start + h', start + w')` over its merged grid
/// `(t, h/merge, w/merge)` and moves the position on by `max(h, w)/merge`. Pads get 0.
/// `grids` are the images in batch order.
pub fn rope_index(
    input_ids: &[Vec<u32>],
    attention_mask: &[Vec<u32>],
    grids: &[[usize; 3]],
    image_token_id: u32,
    merge: usize,
) -> Result<[Vec<u32>; 3]> {
    let t = input_ids.first().map_or(0, Vec::len);
    let n = input_ids.len() * t;
    let mut pos = [vec![0u32; n], vec![0u32; n], vec![0u32; n]];
    let mut grids = grids.iter();
    for (bi, (ids, mask)) in input_ids.iter().zip(attention_mask).enumerate() {
        let kept: Vec<usize> = (0..t).filter(|&i| mask[i] != 0).collect();
        let mut cur = 0u32;
        let mut k = 0;
        while k < kept.len() {
            let is_image = ids[kept[k]] == image_token_id;
            let mut end = k;
            while end < kept.len() && (ids[kept[end]] == image_token_id) == is_image {
                end += 1;
            }
            if is_image {
                let g = grids.next().with_context(|| format!("row {bi} has more image runs than there are images"))?;
                let (gt, gh, gw) = (g[0], g[1] / merge, g[2] / merge);
                ensure!(
                    end - k == gt * gh * gw,
                    "row {bi}: an image run of {} tokens, but its grid {g:?} makes {} (truncated?)",
                    end - k,
                    gt * gh * gw
                );
                let mut i = k;
                for a in 0..gt {
                    for b in 0..gh {
                        for c in 0..gw {
                            let flat = bi * t + kept[i];
                            pos[0][flat] = cur + a as u32;
                            pos[1][flat] = cur + b as u32;
                            pos[2][flat] = cur + c as u32;
                            i += 1;
                        }
                    }
                }
                cur += (g[1].max(g[2]) / merge) as u32;
            } else {
                for (j, &i) in kept[k..end].iter().enumerate() {
                    for p in pos.iter_mut() {
                        p[bi * t + i] = cur + j as u32;
                    }
                }
                cur += (end - k) as u32;
            }
            k = end;
        }
    }
    ensure!(grids.next().is_none(), "more images than image runs in the batch");
    Ok(pos)
}

impl Batch {
    pub fn new(input_ids: Vec<Vec<u32>>, attention_mask: Vec<Vec<u32>>) -> Result<Self> {
        ensure!(!input_ids.is_empty(), "empty batch");
        let t = input_ids[0].len();
        ensure!(t > 0, "batch rows are empty");
        ensure!(
            input_ids.len() == attention_mask.len(),
            "input_ids has {} rows, attention_mask {}",
            input_ids.len(),
            attention_mask.len()
        );
        for (i, (a, m)) in input_ids.iter().zip(&attention_mask).enumerate() {
            ensure!(
                a.len() == t && m.len() == t,
                "row {i}: input_ids/attention_mask length {}/{} != {t}",
                a.len(),
                m.len()
            );
        }
        Ok(Batch { input_ids, attention_mask, visual: None })
    }

    /// This batch with the vision tower's outputs for its image tokens.
    pub fn with_visual(mut self, visual: VisualTokens) -> Result<Self> {
        let (b, t) = self.dims();
        ensure!(
            visual.embeds.dim(0)? == visual.rows.len(),
            "{} image rows, {} embeddings",
            visual.rows.len(),
            visual.embeds.dim(0)?
        );
        ensure!(visual.positions.iter().all(|p| p.len() == b * t), "positions must cover the [{b}, {t}] batch");
        if let Some(&r) = visual.rows.iter().find(|&&r| r as usize >= b * t) {
            bail!("image row {r} is outside the [{b}, {t}] batch");
        }
        self.visual = Some(visual);
        Ok(self)
    }

    /// A batch without padding.
    pub fn unpadded(input_ids: Vec<Vec<u32>>) -> Result<Self> {
        let mask = input_ids.iter().map(|r| vec![1; r.len()]).collect();
        Self::new(input_ids, mask)
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.input_ids.len(), self.input_ids[0].len())
    }
}

/// Sees the head's Linear (`lm_head`) chunk by chunk: its input, logits and dL/dlogits.
pub type HeadSink<'a> = dyn FnMut(&Tensor, &Tensor, &Tensor) -> Result<()> + 'a;

/// Receives one decoder layer in the backward pass: its index, kept activations, attention
/// probabilities and dL/dy of its seven Linears (module order).
type LayerSink<'a> = dyn FnMut(usize, &LayerActs, &Tensor, [Tensor; LINEARS_PER_LAYER]) -> Result<()> + 'a;

/// What a forward keeps for a backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    /// Every layer's activations, and the logits.
    All,
    /// Each layer's input and the final hidden states; no logits.
    Inputs,
    /// Nothing, and no logits (a forward for its Linears' inputs only).
    NoHead,
}

/// What every decoder layer of one batch shares: RoPE tables, masks, `(B, T)`.
struct LayerCtx<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    masks: &'a AttnMasks,
    dims: (usize, usize),
}

/// Activations of one decoder layer kept for the backward pass.
#[derive(Clone)]
struct LayerActs {
    /// Residual stream entering the layer `[N, H]`.
    x: Tensor,
    /// q_proj / k_proj outputs before q_norm/k_norm, `[N·heads, D]`. The rotated queries
    /// and keys and the attention probabilities (`B·Hq·T²` values, the largest part at long
    /// sequences) are recomputed from these when needed ([`TextModel::attention_probs`]).
    q_raw: Tensor,
    k_raw: Tensor,
    /// Values `[B, Hkv, T, D]`.
    v: Tensor,
    /// Residual after attention `[N, H]`.
    h_mid: Tensor,
    /// gate_proj / up_proj outputs `[N, I]`.
    gate: Tensor,
    up: Tensor,
    /// o_proj / down_proj outputs `[N, H]` (not needed by the backward; kept so that
    /// [`TextModel::backward_linears`] can hand out every Linear's output).
    o_out: Tensor,
    mlp_out: Tensor,
}

/// What a forward keeps of one decoder layer for the backward.
#[derive(Clone)]
enum LayerSlot {
    /// Every activation the layer's backward reads.
    Kept(LayerActs),
    /// Only the residual stream entering the layer `[N, H]`: the backward recomputes the
    /// rest with the forward's own kernels (the same bits) when it reaches the layer.
    Input(Tensor),
}

/// A forward pass with everything [`TextModel::backward`] and
/// [`TextModel::backward_linears`] need: every layer's activations
/// ([`TextModel::forward_for_backward`], [`TextModel::forward_cache_bytes`] says how much),
/// or only each layer's input ([`TextModel::forward_checkpointed`],
/// [`TextModel::checkpoint_bytes`]). Cloning it clones reference counts, not activations.
#[derive(Clone)]
pub struct ForwardCache {
    /// `[B, T, V]`; `None` for a checkpointed forward, which never forms the whole batch's
    /// logits (see [`TextModel::backward_linears_ce`]).
    logits: Option<Tensor>,
    /// The final norm's output `[N, H]` (the head's input).
    hidden: Tensor,
    layers: Vec<LayerSlot>,
    /// Residual stream before the final norm `[N, H]`.
    h_last: Tensor,
    cos: Tensor,
    sin: Tensor,
    masks: AttnMasks,
    dims: (usize, usize),
    /// The image tokens' flat rows and the number of DeepStack features, for a batch with
    /// images: the backward then also hands out dL/d(embeddings) and dL/d(features) there.
    visual: Option<(Tensor, usize)>,
}

impl ForwardCache {
    /// `[B, T, V]`. Panics for a checkpointed forward (it has none).
    pub fn logits(&self) -> &Tensor {
        self.logits.as_ref().expect("a checkpointed forward keeps no logits")
    }

    /// The final norm's output `[N, H]`.
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }
}

/// Loss and per-Linear output gradients of one batch.
pub struct LinearGrads {
    pub loss: f32,
    /// `[B, T, V]`.
    pub logits: Tensor,
    /// dL/dy per Linear in module order, each `[N, out]`.
    pub grads: Vec<Tensor>,
}

/// The Qwen3-VL language model.
pub struct TextModel {
    cfg: TextConfig,
    w: LmWeights,
    names: Vec<String>,
    attn: AttnImpl,
    device: Device,
    dtype: DType,
}

impl TextModel {
    /// Loads the language model of the checkpoint folder `dir` in f32 on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, DType::F32, &Device::Cpu)
    }

    pub fn load_with(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = TextConfig::from_dir(dir)?;
        let w = LmWeights::load(dir, &cfg, dtype, device)?;
        Ok(Self::from_parts(cfg, w, dtype, device))
    }

    pub fn from_parts(cfg: TextConfig, w: LmWeights, dtype: DType, device: &Device) -> Self {
        let names = linear_names(cfg.num_hidden_layers);
        TextModel { cfg, w, names, attn: AttnImpl::default(), device: device.clone(), dtype }
    }

    pub fn with_attn_impl(mut self, attn: AttnImpl) -> Self {
        self.attn = attn;
        self
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &LmWeights {
        &self.w
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Hookable Linear names in module order (`layers.0.self_attn.q_proj`, …).
    pub fn linear_names(&self) -> &[String] {
        &self.names
    }

    pub fn num_linears(&self) -> usize {
        self.names.len()
    }

    /// Index of a Linear by name.
    pub fn linear_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// `[out, in]` weight of Linear `idx`.
    pub fn linear_weight(&self, idx: usize) -> &Tensor {
        &self.w.linears[idx]
    }

    /// `[out, in]` weight of a Linear by name.
    pub fn linear_weight_by_name(&self, name: &str) -> Option<&Tensor> {
        self.linear_index(name).map(|i| &self.w.linears[i])
    }

    /// Logits `[B, T, V]`.
    pub fn forward(&self, batch: &Batch, tap: &mut dyn LinearTap) -> Result<Tensor> {
        Ok(self.run(batch, tap, false)?.0.expect("not checkpointed"))
    }

    /// A forward for what `tap` sees of the Linears only: no head, no logits (a
    /// calibration pass). Returns the final hidden states `[N, H]`.
    pub fn forward_no_head(&self, batch: &Batch, tap: &mut dyn LinearTap) -> Result<Tensor> {
        Ok(self.run_from(batch, tap, Keep::NoHead, None, None)?.1)
    }

    /// Final hidden states (after the last norm) `[B, T, H]`.
    pub fn forward_hidden(&self, batch: &Batch, tap: &mut dyn LinearTap) -> Result<Tensor> {
        let (b, t) = batch.dims();
        Ok(self.run(batch, tap, false)?.1.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Forward that keeps the activations [`Self::backward`] needs.
    pub fn forward_for_backward(&self, batch: &Batch, tap: &mut dyn LinearTap) -> Result<ForwardCache> {
        Ok(self.run(batch, tap, true)?.2.expect("kept"))
    }

    /// Forward for a memory-bounded backward: keeps only each decoder layer's input
    /// residual stream and the final hidden states ([`Self::checkpoint_bytes`]), not the
    /// logits; the backward recomputes one layer's activations at a time from its input.
    /// `tap` may observe the Linears but not replace their outputs (the recomputation
    /// would not see the replacement): a replacement is an error.
    pub fn forward_checkpointed(&self, batch: &Batch, tap: &mut dyn LinearTap) -> Result<ForwardCache> {
        let mut observe = |idx: usize, name: &str, x: &Tensor, w: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
            if tap.on_linear(idx, name, x, w, y)?.is_some() {
                bail!("a checkpointed forward cannot take replaced Linear outputs (`{name}`)");
            }
            Ok(None)
        };
        Ok(self.run_from(batch, &mut observe, Keep::Inputs, None, None)?.2.expect("kept"))
    }

    /// Forward, shifted cross-entropy with `ignore_index`, backward: the loss, logits and
    /// dL/dy of every Linear. `tap` sees the forward.
    pub fn linear_output_grads(
        &self,
        batch: &Batch,
        ignore_index: Option<u32>,
        tap: &mut dyn LinearTap,
    ) -> Result<LinearGrads> {
        let fw = self.forward_for_backward(batch, tap)?;
        let ce = loss::shifted_cross_entropy(fw.logits(), &batch.input_ids, ignore_index)?;
        let grads = self.backward(&fw, &ce.dlogits)?;
        Ok(LinearGrads { loss: ce.loss, logits: fw.logits().clone(), grads })
    }

    fn linear(&self, idx: usize, x: &Tensor, tap: &mut dyn LinearTap) -> Result<Tensor> {
        let w = &self.w.linears[idx];
        let y = matmul_xwt(x, w)?;
        match tap.on_linear(idx, &self.names[idx], x, w, &y).with_context(|| format!("tap on {}", self.names[idx]))? {
            None => Ok(y),
            Some(y2) => {
                if y2.dims() != y.dims() {
                    bail!("tap on {} replaced output of shape {:?} with {:?}", self.names[idx], y.dims(), y2.dims());
                }
                Ok(y2)
            }
        }
    }

    /// Logits `[B, T, V]` and the residual stream entering each decoder layer `[N, H]`, in
    /// layer order (for [`Self::forward_from`]).
    pub fn forward_layer_inputs(&self, batch: &Batch, tap: &mut dyn LinearTap) -> Result<(Tensor, Vec<Tensor>)> {
        let mut inputs = Vec::with_capacity(self.cfg.num_hidden_layers);
        let (logits, ..) = self.run_from(batch, tap, Keep::Nothing, None, Some(&mut inputs))?;
        Ok((logits.expect("not checkpointed"), inputs))
    }

    /// Logits `[B, T, V]` of a forward that starts at decoder layer `layer` with the
    /// residual stream `h: [N, H]` entering it (as [`Self::forward_layer_inputs`] recorded
    /// it). When the layers before `layer` are unchanged, this equals a full forward bit
    /// for bit. `tap` sees the Linears from that layer on (indices as in a full forward).
    pub fn forward_from(&self, batch: &Batch, layer: usize, h: &Tensor, tap: &mut dyn LinearTap) -> Result<Tensor> {
        ensure!(layer < self.cfg.num_hidden_layers, "layer {layer} out of range");
        let (b, t) = batch.dims();
        ensure!(h.dims() == [b * t, self.cfg.hidden_size], "residual stream {:?} for a [{b}, {t}] batch", h.dims());
        Ok(self.run_from(batch, tap, Keep::Nothing, Some((layer, h.clone())), None)?.0.expect("not checkpointed"))
    }

    /// The final hidden states `[N, H]` (the head's input) of a forward that starts at
    /// decoder layer `layer` with the residual stream `h` entering it, as
    /// [`Self::forward_from`] (whose logits are `self.head_logits` of these).
    pub fn hidden_from(&self, batch: &Batch, layer: usize, h: &Tensor, tap: &mut dyn LinearTap) -> Result<Tensor> {
        ensure!(layer < self.cfg.num_hidden_layers, "layer {layer} out of range");
        let (b, t) = batch.dims();
        ensure!(h.dims() == [b * t, self.cfg.hidden_size], "residual stream {:?} for a [{b}, {t}] batch", h.dims());
        Ok(self.run_from(batch, tap, Keep::NoHead, Some((layer, h.clone())), None)?.1)
    }

    /// The final hidden states `[N, H]` and each decoder layer's input residual stream of
    /// an unquantized forward, without the logits (for [`Self::hidden_from`]).
    pub fn hidden_and_layer_inputs(&self, batch: &Batch, tap: &mut dyn LinearTap) -> Result<(Tensor, Vec<Tensor>)> {
        let mut inputs = Vec::with_capacity(self.cfg.num_hidden_layers);
        let (_, hidden, _) = self.run_from(batch, tap, Keep::NoHead, None, Some(&mut inputs))?;
        Ok((hidden, inputs))
    }

    /// Logits `[rows, V]` of the rows `rows` of final hidden states `hidden: [N, H]` — the
    /// head on a slice of positions, with the kernel a whole forward uses (the same bits
    /// per row).
    pub fn head_logits(&self, hidden: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let h = hidden.narrow(0, rows.start, rows.len())?;
        matmul_xwt(&h, self.w.output_weight())
    }

    /// Logits `[B, T, V]`, final hidden states `[N, H]`, and the cache when `keep`.
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        batch: &Batch,
        tap: &mut dyn LinearTap,
        keep: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<ForwardCache>)> {
        self.run_from(batch, tap, if keep { Keep::All } else { Keep::Nothing }, None, None)
    }

    /// [`Self::run`] starting at decoder layer `from.0` with residual stream `from.1`
    /// (keeping nothing), recording each layer's input residual stream into `record`.
    /// Logits only when the whole batch's are wanted: not with [`Keep::Inputs`].
    #[allow(clippy::type_complexity)]
    fn run_from(
        &self,
        batch: &Batch,
        tap: &mut dyn LinearTap,
        keep: Keep,
        from: Option<(usize, Tensor)>,
        mut record: Option<&mut Vec<Tensor>>,
    ) -> Result<(Option<Tensor>, Tensor, Option<ForwardCache>)> {
        debug_assert!(keep != Keep::All || from.is_none(), "a kept forward starts at layer 0");
        let cache = matches!(keep, Keep::All | Keep::Inputs) && from.is_none();
        let c = &self.cfg;
        let (b, t) = batch.dims();
        if t > c.max_position_embeddings {
            bail!(
                "sequence length {t} exceeds max_position_embeddings {} of the model; truncate the calibration \
                 tokens (max_length) to at most that",
                c.max_position_embeddings
            );
        }
        let n = b * t;
        let dev = &self.device;

        let flat: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
        if let Some(bad) = flat.iter().find(|&&id| id as usize >= c.vocab_size) {
            bail!("token id {bad} is outside the vocabulary (vocab_size {})", c.vocab_size);
        }
        let visual = batch.visual.as_ref();
        let rows = visual.map(|v| Tensor::from_vec(v.rows.clone(), v.rows.len(), dev)).transpose()?;
        let (first, mut h) = match from {
            Some((l, h)) => (l, h),
            None => {
                let e = self.w.embed_tokens.index_select(&Tensor::from_vec(flat, n, dev)?, 0)?.to_dtype(self.dtype)?;
                match visual {
                    // `masked_scatter`: the image tokens' rows taken from the tower's output
                    // (a gather, so exactly those values).
                    Some(v) => {
                        let mut gather: Vec<u32> = (0..n as u32).collect();
                        for (k, &r) in v.rows.iter().enumerate() {
                            gather[r as usize] = (n + k) as u32;
                        }
                        let both = Tensor::cat(&[e, v.embeds.to_dtype(self.dtype)?.to_device(dev)?], 0)?;
                        (0, both.index_select(&Tensor::from_vec(gather, n, dev)?, 0)?)
                    }
                    None => (0, e),
                }
            }
        };
        let (cos, sin) = match visual {
            Some(v) => ops::mrope_tables(
                &v.positions,
                (b, t),
                c.head_dim,
                c.rope_theta,
                (&c.mrope_section, c.mrope_interleaved),
                self.dtype,
                dev,
            )?,
            None => ops::rope_tables(t, c.head_dim, c.rope_theta, self.dtype, dev)?,
        };
        let masks = AttnMasks::new(&batch.attention_mask, t, self.dtype, dev)?;
        let mut layers = Vec::with_capacity(if cache { c.num_hidden_layers } else { 0 });
        let ctx = LayerCtx { cos: &cos, sin: &sin, masks: &masks, dims: (b, t) };
        for l in first..c.num_hidden_layers {
            if let Some(r) = record.as_deref_mut() {
                r.push(h.clone());
            }
            let x = h;
            let (out, acts) = self.layer_forward(l, &x, &ctx, tap)?;
            h = out;
            // DeepStack: the j-th feature joins the residual stream after decoder layer j.
            if let (Some(v), Some(rows)) = (visual, &rows) {
                if let Some(ds) = v.deepstack.get(l) {
                    h = h.index_add(rows, &ds.to_dtype(self.dtype)?.to_device(dev)?, 0)?;
                }
            }
            if cache {
                layers.push(match keep {
                    Keep::All => LayerSlot::Kept(acts),
                    _ => LayerSlot::Input(x),
                });
            }
        }
        let hidden = ops::rms_norm(&h, &self.w.norm, c.rms_norm_eps)?;
        ensure_finite(&hidden, || "the final norm's output".to_string())?;
        let logits = match keep {
            Keep::Inputs | Keep::NoHead => None,
            _ => Some(matmul_xwt(&hidden, self.w.output_weight())?.reshape((b, t, c.vocab_size))?),
        };
        let kept = cache.then(|| ForwardCache {
            logits: logits.clone(),
            hidden: hidden.clone(),
            layers,
            h_last: h,
            cos,
            sin,
            masks,
            dims: (b, t),
            visual: rows.map(|r| (r, visual.map_or(0, |v| v.deepstack.len()))),
        });
        Ok((logits, hidden, kept))
    }

    /// Decoder layer `l` on its input residual stream `x: [N, H]`: its output residual
    /// stream and its activations. The forward and the backward's recomputation both run
    /// this, so both see the same bits.
    fn layer_forward(
        &self,
        l: usize,
        x: &Tensor,
        ctx: &LayerCtx<'_>,
        tap: &mut dyn LinearTap,
    ) -> Result<(Tensor, LayerActs)> {
        let c = &self.cfg;
        let (b, t) = ctx.dims;
        let (hq, hkv, d, g) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.group_size());
        let (n, eps) = (b * t, c.rms_norm_eps);
        let nw = &self.w.norms[l];
        let i0 = l * LINEARS_PER_LAYER;
        let n1 = ops::rms_norm(x, &nw.input_layernorm, eps)?;
        let q_raw = self.linear(i0, &n1, tap)?.reshape((n * hq, d))?;
        let k_raw = self.linear(i0 + 1, &n1, tap)?.reshape((n * hkv, d))?;
        let v = self.linear(i0 + 2, &n1, tap)?;
        let v = v.reshape((b, t, hkv, d))?.transpose(1, 2)?.contiguous()?;
        let (_, _, p) = self.attention_probs(l, &q_raw, &k_raw, ctx.cos, ctx.sin, ctx.masks, (b, t))?;
        // [B,Hkv,G·T,D] → [B,Hkv,G,T,D] → [B,T,Hkv,G,D] → [N, Hq·D]
        let o =
            bmm_n(&p, &v)?.reshape((b, hkv, g, t, d))?.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((n, hq * d))?;
        let o_out = self.linear(i0 + 3, &o, tap)?;
        let h_mid = (x + &o_out)?;
        let n2 = ops::rms_norm(&h_mid, &nw.post_attention_layernorm, eps)?;
        let gate = self.linear(i0 + 4, &n2, tap)?;
        let up = self.linear(i0 + 5, &n2, tap)?;
        let a = ops::swiglu(&gate, &up)?;
        let mlp_out = self.linear(i0 + 6, &a, tap)?;
        let h = (&h_mid + &mlp_out)?;
        ensure_finite(&h, || format!("the output of decoder layer layers.{l}"))?;
        Ok((h, LayerActs { x: x.clone(), q_raw, k_raw, v, h_mid, gate, up, o_out, mlp_out }))
    }

    /// Layer `l`'s rotated queries `[B, Hkv, G·T, D]` (query head = kv·G + g), rotated keys
    /// `[B, Hkv, T, D]` and attention probabilities `[B, Hkv, G·T, T]` from its q_proj and
    /// k_proj outputs `[N·heads, D]`: the same kernels in the forward and, recomputing, in
    /// the backward, so both see the same bits.
    #[allow(clippy::too_many_arguments)]
    fn attention_probs(
        &self,
        l: usize,
        q_raw: &Tensor,
        k_raw: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        masks: &AttnMasks,
        (b, t): (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (hq, hkv, d, g) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.group_size());
        let (nw, eps) = (&self.w.norms[l], c.rms_norm_eps);
        // [B,T,Hkv,G,D] → [B,Hkv,G,T,D] = [B,Hq,T,D] with query head = kv·G + g
        let q = ops::qk_norm_rope(q_raw, &nw.q_norm, eps, cos, sin, (b, t, hq))?.reshape((b, hkv, g * t, d))?;
        let k = ops::qk_norm_rope(k_raw, &nw.k_norm, eps, cos, sin, (b, t, hkv))?;
        let s = bmm_t(&q, &k)?.reshape((b, hkv, g, t, t))?;
        let scale = 1.0 / (d as f64).sqrt();
        let p = ops::masked_softmax(&s, scale, masks, self.attn == AttnImpl::Sdpa)?.reshape((b, hkv, g * t, t))?;
        Ok((q, k, p))
    }

    /// Bytes a [`ForwardCache`] of a `[b, t]` batch holds, in the model's dtype:
    /// per layer `N·(4H + Hq·D + 2·Hkv·D + 2I)` values, plus the logits, the last residual,
    /// the RoPE tables and the masks (N = b·t).
    pub fn forward_cache_bytes(&self, b: usize, t: usize) -> u64 {
        let c = &self.cfg;
        let n = (b * t) as u64;
        let (h, i, d) = (c.hidden_size as u64, c.intermediate_size as u64, c.head_dim as u64);
        let (hq, hkv) = (c.num_attention_heads as u64, c.num_key_value_heads as u64);
        let per_layer = n * (4 * h + hq * d + 2 * hkv * d + 2 * i);
        let values = c.num_hidden_layers as u64 * per_layer
            + n * (c.vocab_size as u64 + h)
            + 2 * (t as u64) * d
            + (b * t * (t + 1)) as u64;
        values * self.dtype.size_in_bytes() as u64
    }

    /// What a [`Self::forward_checkpointed`] of a `[b, t]` batch and its
    /// [`Self::backward_linears_ce`] hold, by part ([`memory::needs`]).
    pub fn memory_needs(&self, b: usize, t: usize) -> memory::Needs {
        memory::needs(&self.cfg, b, t, self.dtype.size_in_bytes())
    }

    /// dL/dy of every Linear output (module order, each `[N, out]`) given dL/dlogits
    /// `[B, T, V]` of the forward in `fw`.
    pub fn backward(&self, fw: &ForwardCache, dlogits: &Tensor) -> Result<Vec<Tensor>> {
        let mut grads: Vec<Option<Tensor>> = vec![None; self.names.len()];
        let dhidden = self.head_backward(fw, dlogits)?;
        // Cloning the cache clones reference counts, not activations.
        self.backward_layers(fw.clone(), dhidden, &mut |l, _, _, g| {
            for (k, g) in g.into_iter().enumerate() {
                grads[l * LINEARS_PER_LAYER + k] = Some(g);
            }
            Ok(())
        })?;
        Ok(grads.into_iter().map(|g| g.expect("every linear gets a gradient")).collect())
    }

    /// dL/dhidden `[N, H]` from dL/dlogits `[B, T, V]`.
    fn head_backward(&self, fw: &ForwardCache, dlogits: &Tensor) -> Result<Tensor> {
        let (b, t) = fw.dims;
        let v = self.cfg.vocab_size;
        ensure!(dlogits.dims() == [b, t, v], "dlogits shape {:?} != [{b}, {t}, {v}]", dlogits.dims());
        matmul_xw(&dlogits.reshape((b * t, v))?, self.w.output_weight())
    }

    /// The backward of `fw` given dL/dlogits, one decoder layer at a time from the last:
    /// once a layer's gradients are known, `sink(idx, x, y, dy)` sees each of its Linears
    /// (module order within the layer) with its input `x: [N, in]` and output `y: [N, out]`
    /// — equal bit for bit to what a tap saw in the forward: inputs are recomputed from the
    /// kept activations with the forward's own kernels — and `dy = dL/dy: [N, out]`. The
    /// layer's kept activations are freed right after, so the memory held falls as the
    /// backward goes: the cache plus one layer's gradients and inputs at most.
    pub fn backward_linears(
        &self,
        fw: ForwardCache,
        dlogits: &Tensor,
        sink: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let dhidden = self.head_backward(&fw, dlogits)?;
        self.backward_linears_from(fw, dhidden, sink)?;
        Ok(())
    }

    /// [`Self::backward_linears`] of the mean shifted cross-entropy of `labels` (as
    /// [`loss::shifted_cross_entropy`], times `loss_scale`), with the head computed over
    /// `head_rows` positions at a time: per chunk its logits `[rows, V]`, their loss and
    /// dL/dlogits, and that chunk's dL/dhidden — never the whole batch's `[N, V]`. Every
    /// row's values are those of the whole-batch computation, bit for bit (the products
    /// and the gradient are row by row; only the loss's sum is grouped by chunk). Works on
    /// a kept or a checkpointed forward. Returns the loss.
    pub fn backward_linears_ce(
        &self,
        fw: ForwardCache,
        labels: &[Vec<u32>],
        ignore_index: Option<u32>,
        loss_scale: f64,
        head_rows: usize,
        sink: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<f64> {
        Ok(self.backward_ce(fw, labels, ignore_index, loss_scale, head_rows, None, sink)?.0)
    }

    /// [`Self::backward_linears_ce`] that also shows `head_sink` the head's Linear
    /// (`lm_head`) chunk by chunk — its input `[rows, H]`, logits `[rows, V]` and
    /// dL/dlogits — and, for a batch with images, returns dL/d(the tower's outputs).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_ce(
        &self,
        fw: ForwardCache,
        labels: &[Vec<u32>],
        ignore_index: Option<u32>,
        loss_scale: f64,
        head_rows: usize,
        mut head_sink: Option<&mut HeadSink<'_>>,
        sink: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<(f64, Option<VisualGrads>)> {
        let (b, t) = fw.dims;
        let (targets, weights, count) = loss::shifted_targets(labels, (b, t), self.cfg.vocab_size, ignore_index)?;
        let n = b * t;
        let w = self.w.output_weight();
        let mut loss = 0f64;
        let mut parts = Vec::new();
        for r0 in (0..n).step_by(head_rows.max(1)) {
            let r1 = (r0 + head_rows.max(1)).min(n);
            let logits = self.head_logits(&fw.hidden, r0..r1)?;
            let (l, dlogits) = loss::cross_entropy_rows(&logits, &targets[r0..r1], &weights[r0..r1])?;
            loss += l;
            let dlogits = if loss_scale == 1.0 { dlogits } else { (dlogits * loss_scale)? };
            if let Some(hs) = head_sink.as_deref_mut() {
                hs(&fw.hidden.narrow(0, r0, r1 - r0)?, &logits, &dlogits)?;
            }
            parts.push(matmul_xw(&dlogits, w)?);
        }
        let dhidden = Tensor::cat(&parts, 0)?;
        drop(parts);
        let visual = self.backward_linears_from(fw, dhidden, sink)?;
        Ok((if count == 0 { f64::NAN } else { loss }, visual))
    }

    /// [`Self::backward_linears`] from dL/dhidden `[N, H]`; for a batch with images, also
    /// dL/d(the tower's outputs).
    fn backward_linears_from(
        &self,
        fw: ForwardCache,
        dhidden: Tensor,
        sink: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<Option<VisualGrads>> {
        let c = &self.cfg;
        let (b, t) = fw.dims;
        let (hq, hkv, d, g) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.group_size());
        let (n, eps) = (b * t, c.rms_norm_eps);
        self.backward_layers(fw, dhidden, &mut |l, a, p, [dq, dk, dv, dh_mid, dgate, dup, ddown]| {
            let nw = &self.w.norms[l];
            let i0 = l * LINEARS_PER_LAYER;
            let n1 = ops::rms_norm(&a.x, &nw.input_layernorm, eps)?;
            sink(i0, &n1, &a.q_raw.reshape((n, hq * d))?, &dq)?;
            sink(i0 + 1, &n1, &a.k_raw.reshape((n, hkv * d))?, &dk)?;
            // [B,Hkv,T,D] → [B,T,Hkv,D] undoes the forward's transpose exactly
            sink(i0 + 2, &n1, &a.v.transpose(1, 2)?.contiguous()?.reshape((n, hkv * d))?, &dv)?;
            let o = bmm_n(p, &a.v)?
                .reshape((b, hkv, g, t, d))?
                .permute((0, 3, 1, 2, 4))?
                .contiguous()?
                .reshape((n, hq * d))?;
            sink(i0 + 3, &o, &a.o_out, &dh_mid)?;
            let n2 = ops::rms_norm(&a.h_mid, &nw.post_attention_layernorm, eps)?;
            sink(i0 + 4, &n2, &a.gate, &dgate)?;
            sink(i0 + 5, &n2, &a.up, &dup)?;
            sink(i0 + 6, &ops::swiglu(&a.gate, &a.up)?, &a.mlp_out, &ddown)
        })
    }

    /// The backward pass proper, from dL/dhidden `[N, H]`. Per decoder layer `l`, last
    /// first, `on_layer` gets the layer's activations (kept, or recomputed from its kept
    /// input), its attention probabilities `[B, Hkv, G·T, T]` and dL/dy of its seven
    /// Linears in module order; the activations are dropped after it returns.
    fn backward_layers(
        &self,
        mut fw: ForwardCache,
        dhidden: Tensor,
        on_layer: &mut LayerSink<'_>,
    ) -> Result<Option<VisualGrads>> {
        let c = &self.cfg;
        let (b, t) = fw.dims;
        let (hq, hkv, d, g) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.group_size());
        let n = b * t;
        ensure!(dhidden.dims() == [n, c.hidden_size], "dhidden shape {:?} != [{n}, {}]", dhidden.dims(), c.hidden_size);
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (d as f64).sqrt();
        let neg_sin = fw.sin.neg()?;
        let lw = &self.w.linears;
        fw.logits = None;

        let mut dh = ops::rms_norm_backward(&fw.h_last, &self.w.norm, eps, &dhidden)?;
        drop(dhidden);
        let visual = fw.visual.take();
        let mut ds_grads: Vec<Option<Tensor>> = vec![None; visual.as_ref().map_or(0, |v| v.1)];

        while let Some(slot) = fw.layers.pop() {
            let l = fw.layers.len();
            // dL/d(layer l's output) is dL/d(the DeepStack feature added there).
            if let (Some((rows, _)), Some(g)) = (&visual, ds_grads.get_mut(l)) {
                *g = Some(dh.index_select(rows, 0)?);
            }
            let a = match slot {
                LayerSlot::Kept(a) => a,
                LayerSlot::Input(x) => {
                    let ctx = LayerCtx { cos: &fw.cos, sin: &fw.sin, masks: &fw.masks, dims: (b, t) };
                    self.layer_forward(l, &x, &ctx, &mut NoTap)?.1
                }
            };
            let nw = &self.w.norms[l];
            let i0 = l * LINEARS_PER_LAYER;
            // MLP: h = h_mid + down(silu(gate)·up)
            let ddown = dh.clone();
            let dact = matmul_xw(&dh, &lw[i0 + 6])?;
            let (dgate, dup) = ops::swiglu_backward(&a.gate, &a.up, &dact)?;
            let dn2 = (matmul_xw(&dgate, &lw[i0 + 4])? + matmul_xw(&dup, &lw[i0 + 5])?)?;
            let dh_mid = (&dh + ops::rms_norm_backward(&a.h_mid, &nw.post_attention_layernorm, eps, &dn2)?)?;

            // attention: h_mid = x + o_proj(attn)
            let dattn = matmul_xw(&dh_mid, &lw[i0 + 3])?;
            // rows that saw no key have p = 0 under SDPA, so they pass no gradient on
            let d_o = dattn.reshape((b, t, hkv, g, d))?.permute((0, 2, 3, 1, 4))?.contiguous()?.reshape((
                b,
                hkv,
                g * t,
                d,
            ))?;
            let dp = bmm_t(&d_o, &a.v)?;
            let (q, k, p) = self.attention_probs(l, &a.q_raw, &a.k_raw, &fw.cos, &fw.sin, &fw.masks, (b, t))?;
            let dv = bmm_tn(&p, &d_o)?; // [B,Hkv,T,D]
            let ds = (ops::softmax_backward(&p, &dp)? * scale)?;
            let dq = bmm_n(&ds, &k)?; // [B,Hkv,G·T,D]
            let dk = bmm_tn(&ds, &q)?; // [B,Hkv,T,D]
            let dq = ops::rope_backward(&dq.reshape((b, hq, t, d))?, &fw.cos, &neg_sin)?;
            let dk = ops::rope_backward(&dk, &fw.cos, &neg_sin)?;
            let dq = dq.transpose(1, 2)?.contiguous()?.reshape((n * hq, d))?;
            let dk = dk.transpose(1, 2)?.contiguous()?.reshape((n * hkv, d))?;
            let dq = ops::rms_norm_backward(&a.q_raw, &nw.q_norm, eps, &dq)?.reshape((n, hq * d))?;
            let dk = ops::rms_norm_backward(&a.k_raw, &nw.k_norm, eps, &dk)?.reshape((n, hkv * d))?;
            let dv = dv.transpose(1, 2)?.contiguous()?.reshape((n, hkv * d))?;
            if l > 0 || visual.is_some() {
                // nothing before layer 0 needs a gradient, but the image tokens' embeddings
                let dn1 = ((matmul_xw(&dq, &lw[i0])? + matmul_xw(&dk, &lw[i0 + 1])?)? + matmul_xw(&dv, &lw[i0 + 2])?)?;
                dh = (&dh_mid + ops::rms_norm_backward(&a.x, &nw.input_layernorm, eps, &dn1)?)?;
            }
            on_layer(l, &a, &p, [dq, dk, dv, dh_mid, dgate, dup, ddown])?;
        }
        let Some((rows, _)) = visual else { return Ok(None) };
        Ok(Some(VisualGrads {
            embeds: dh.index_select(&rows, 0)?,
            deepstack: ds_grads
                .into_iter()
                .map(|g| g.context("a DeepStack feature past the last layer"))
                .collect::<Result<_>>()?,
        }))
    }
}

/// Errors naming `what` when `t` holds NaN or ±Inf (activations overflowing or a tap
/// returning non-finite outputs).
fn ensure_finite(t: &Tensor, what: impl FnOnce() -> String) -> Result<()> {
    let finite = match fused::all_finite(t) {
        Some(f) => f,
        None => weights::check_finite(t).is_ok(),
    };
    if !finite {
        bail!(
            "non-finite activation (NaN or Inf) in {}; check the checkpoint and the tap's replacement outputs",
            what()
        );
    }
    Ok(())
}

/// `t` as the GEMM reads it: contiguous (a copy only when it is a strided view).
fn dense(t: &Tensor) -> Result<Tensor> {
    Ok(t.contiguous()?)
}

/// Batched `a · bᵀ` (attention scores).
pub(crate) fn bmm_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(y) = gemm::batched_matmul(&dense(a)?, &dense(b)?, gemm::RhsLayout::Transposed) {
        return Ok(y);
    }
    Ok(a.matmul(&b.t()?)?)
}

/// Batched `aᵀ · b`.
pub(crate) fn bmm_tn(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(y) = gemm::batched_matmul_lhs_t(&dense(a)?, &dense(b)?, gemm::RhsLayout::Normal) {
        return Ok(y);
    }
    Ok(a.t()?.matmul(b)?)
}

/// Batched `a · b`.
pub(crate) fn bmm_n(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(y) = gemm::batched_matmul(&dense(a)?, &dense(b)?, gemm::RhsLayout::Normal) {
        return Ok(y);
    }
    Ok(a.matmul(b)?)
}

/// `x · wᵀ` for `x: [N, in]`, `w: [out, in]` — the product every Linear of the model
/// computes ([`gemm`]: the same bits on every CPU level; candle's matmul only for
/// tensors it cannot take, such as other dtypes). Use it to compute replacement outputs so
/// that an identity replacement reproduces `y` bit for bit.
pub fn matmul_xwt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(y) = gemm::matmul(&dense(x)?, &dense(w)?, gemm::RhsLayout::Transposed) {
        return Ok(y);
    }
    // A weight held in the checkpoint's half precision (see [`weights`]), widened here.
    Ok(x.matmul(&w.to_dtype(x.dtype())?.t()?)?)
}

/// `dy · w` for `dy: [N, out]`, `w: [out, in]` (a Linear's input gradient).
pub fn matmul_xw(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(dx) = gemm::matmul(&dense(dy)?, &dense(w)?, gemm::RhsLayout::Normal) {
        return Ok(dx);
    }
    Ok(dy.matmul(&w.to_dtype(dy.dtype())?)?)
}

#[cfg(test)]
mod tests;
