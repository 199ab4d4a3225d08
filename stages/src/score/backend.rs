//! What the scorer needs from a language model, and from a quantization format.
//!
//! The scorer never runs the model once per layer: it asks the model for one unquantized
//! forward + backward per score batch and receives, per linear, the input `X` and the
//! gradient of the loss with respect to the output `dL/dY`; everything else is matmuls on
//! those. `kl_div` needs whole-model forwards with one recipe's linears replaced.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;

use super::recipes::LinearInfo;
pub use qpipe_model::memory::Needs;
use qpipe_quant::IntCodes;

/// One batch of calibration tokens (left padded), and for image-text calibration the
/// image of each row.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, T]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B, T]` 1 = token, 0 = pad.
    pub attention_mask: Vec<Vec<u32>>,
    /// Labels are the input ids; positions whose label is this id are ignored by the loss.
    pub pad_token_id: u32,
    /// Further token ids the loss ignores (the vision tokens of image-text calibration).
    pub ignored_token_ids: Vec<u32>,
    /// One image per row for image-text calibration (its image tokens in the row), empty
    /// for text.
    pub images: Vec<RowImage>,
}

/// One row's image, preprocessed: `[t·h·w, C·T·p·p]` patch rows and its patch grid.
#[derive(Debug, Clone)]
pub struct RowImage {
    pub pixel_values: Tensor,
    pub grid_thw: [usize; 3],
}

impl Batch {
    /// A batch of text rows.
    pub fn text(input_ids: Vec<Vec<u32>>, attention_mask: Vec<Vec<u32>>, pad_token_id: u32) -> Batch {
        Batch { input_ids, attention_mask, pad_token_id, ignored_token_ids: Vec::new(), images: Vec::new() }
    }

    /// The sub-batch of rows `r`.
    pub fn rows(&self, r: std::ops::Range<usize>) -> Batch {
        Batch {
            input_ids: self.input_ids[r.clone()].to_vec(),
            attention_mask: self.attention_mask[r.clone()].to_vec(),
            pad_token_id: self.pad_token_id,
            ignored_token_ids: self.ignored_token_ids.clone(),
            images: if self.images.is_empty() { Vec::new() } else { self.images[r].to_vec() },
        }
    }

    /// Whether the loss ignores a position whose label is `y`.
    pub fn ignores(&self, y: u32) -> bool {
        y == self.pad_token_id || self.ignored_token_ids.contains(&y)
    }
}

/// Fake-quantizes one linear's input.
pub type InputQuant<'a> = dyn Fn(&Tensor) -> Result<Tensor> + Sync + 'a;

/// A replaced linear for a quantized forward: `y = q_in(x) · w^T`.
pub struct LinearOverride<'a> {
    /// The fake-quantized weight `[out, in]`.
    pub weight: Tensor,
    /// Fake-quantizes the input, when the format quantizes activations.
    pub input: Option<&'a InputQuant<'a>>,
}

/// Sees one linear after the backward of a score batch: its name, its input `X`
/// (`[tokens, in]`) and output `Y = X Wᵀ` (`[tokens, out]`) in the unquantized forward, and
/// `dL/dY` (`[tokens, out]`).
pub type LinearSink<'a> = dyn FnMut(&str, &Tensor, &Tensor, &Tensor) -> Result<()> + 'a;

/// An unquantized forward pass the model keeps for its backward; opaque to the scorer.
pub type KeptForward = Box<dyn std::any::Any>;

/// Receives one linear's input `X` (`[tokens, in]`) during a calibration forward.
pub type InputSink<'a> = dyn FnMut(&str, &Tensor) -> Result<()> + 'a;

/// The language model as the scorer drives it.
pub trait ScoreModel {
    /// Every scorable linear, in module order.
    fn linears(&self) -> Vec<LinearInfo>;
    /// The unquantized weight of a linear, `[out, in]`, in the model's dtype.
    fn weight(&self, name: &str) -> Result<Tensor>;
    /// The compute dtype, as the state records it (`f32`).
    fn dtype_name(&self) -> &'static str;
    /// Memory free where the model computes (host RAM or GPU memory), for the scorer's
    /// memory plan; `None` when unknown.
    fn available_memory(&self) -> Option<u64>;
    /// One unquantized forward; `sink` gets every linear's input.
    fn forward_inputs(&self, batch: &Batch, sink: &mut InputSink<'_>) -> Result<()>;
    /// One unquantized forward that keeps what [`Self::backward_linears`] needs (each
    /// decoder layer's input: the backward recomputes one layer at a time); `sink` gets
    /// every linear's input, as in [`Self::forward_inputs`].
    fn forward_keep(&self, batch: &Batch, sink: &mut InputSink<'_>) -> Result<KeptForward>;
    /// Bytes the weights take, as held.
    fn weight_bytes(&self) -> u64;
    /// What a forward/backward of `batch` holds, by part (the scorer's memory plan).
    fn memory_needs(&self, batch: &Batch) -> Needs;
    /// The backward of the mean cross-entropy of the shifted logits (ignore_index = pad id)
    /// of a kept forward, its gradient multiplied by `loss_scale` (1 for a whole batch; a
    /// slice's share of the batch's targets when a batch is scored in slices), the head
    /// taken `head_rows` positions at a time; then `sink` sees every linear with its input,
    /// output and output gradient, one decoder layer at a time from the last. Returns the
    /// loss.
    fn backward_linears(
        &self,
        batch: &Batch,
        kept: KeptForward,
        loss_scale: f64,
        head_rows: usize,
        sink: &mut LinearSink<'_>,
    ) -> Result<f64>;
    /// One unquantized forward: its final hidden states `[N, H]` (the head's input) and
    /// what [`Self::hidden_resumed`] needs to redo it with some linears replaced.
    fn forward_resumable(&self, batch: &Batch) -> Result<(Tensor, KeptForward)>;
    /// Final hidden states `[N, H]` with the named linears replaced, equal to a whole
    /// forward of `batch` with them replaced; the model may start from `kept` (of
    /// [`Self::forward_resumable`] on the same batch) where the replacements begin.
    fn hidden_resumed(
        &self,
        batch: &Batch,
        kept: &KeptForward,
        overrides: &HashMap<String, LinearOverride<'_>>,
    ) -> Result<Tensor>;
    /// Logits `[rows, V]` of positions `rows` of final hidden states `[N, H]` — the same
    /// values, row by row, as the whole batch's logits.
    fn head_logits(&self, hidden: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor>;
    /// [`Self::head_logits`] with the overrides that apply to the head (a model whose head
    /// is a scored Linear); the others are ignored.
    fn head_logits_with(
        &self,
        hidden: &Tensor,
        rows: std::ops::Range<usize>,
        _overrides: &HashMap<String, LinearOverride<'_>>,
    ) -> Result<Tensor> {
        self.head_logits(hidden, rows)
    }
    /// The vocabulary size (the head's width).
    fn vocab_size(&self) -> usize;
    /// A line on where the time went, for the stage's log once scoring is done.
    fn report(&self) -> Option<String> {
        None
    }
}

/// One quantization format as the scorer uses it (see `score::adapters` for the adapter to
/// the `quant` module). It keeps the calibrated input ranges of every linear itself.
pub trait ScoreFormat: Sync {
    /// `NAME(effective-bits: B)` as ModelOpt prints the recipe.
    fn display_name(&self) -> String;
    /// Effective bits for the cost model (ModelOpt's `estimate_quant_compression` × 16).
    fn effective_bits(&self) -> f64;
    /// Whether inputs are quantized at all.
    fn quantizes_input(&self) -> bool;
    /// Whether inputs need max calibration (static ranges) before scoring.
    fn input_needs_calibration(&self) -> bool;
    /// Fold one calibration batch's input `x` (`[tokens, in]`) of `linear` into its range;
    /// an error when `x` has NaN or ±inf (the scorer adds which linear and batch).
    fn observe_input(&self, linear: &str, x: &Tensor) -> Result<()>;
    /// The calibrated per-tensor input amax of `linear` (its max, for diagnostics).
    fn input_amax(&self, linear: &str) -> Option<f32>;
    /// Fake-quantized weight `[out, in]` (ranges from the weight itself), in f32 whatever
    /// the weight's dtype: the quantized values exactly, on the weight's device.
    fn quant_weight(&self, linear: &str, w: &Tensor) -> Result<Tensor>;
    /// Fake-quantized input `[tokens, in]` with the calibrated (or dynamic) range, in f32
    /// on the input's device.
    fn quant_input(&self, linear: &str, x: &Tensor) -> Result<Tensor>;
    /// Whether quantizing a convolution whose stride equals its kernel (the vision tower's
    /// `patch_embed.proj`) as the Linear over its flattened patches gives what ModelOpt
    /// computes on the 5-D weight and input, where blocks and per-row ranges run along the
    /// last axis of `kernel_width` values: per-tensor and per-output-channel weights and
    /// per-tensor inputs do; blocks do when they divide the kernel width.
    fn conv_as_linear_exact(&self, _kernel_width: usize) -> bool {
        true
    }
    /// [`Self::quant_weight`] as integer codes (`Wq = codes / divisor`), when the weight
    /// format is a signed integer grid of at most 8 bits with per-channel or per-tensor
    /// ranges and `w` is on the CPU; `None` otherwise.
    fn quant_weight_codes(&self, _linear: &str, _w: &Tensor) -> Result<Option<IntCodes>> {
        Ok(None)
    }
    /// [`Self::quant_input`] as integer codes, on the same terms as
    /// [`Self::quant_weight_codes`].
    fn quant_input_codes(&self, _linear: &str, _x: &Tensor) -> Result<Option<IntCodes>> {
        Ok(None)
    }
}
