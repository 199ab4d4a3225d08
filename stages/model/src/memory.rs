//! What a memory-bounded forward and backward of the language model hold, by part, for a
//! batch shape: the numbers the scorer's memory plan sizes its slices and head chunks by.
//! Pure arithmetic on the config, so a plan can be checked without loading a model
//! (`score::memory` in the stages crate puts the parts together).
//!
//! All counts are bytes. `act` is the size of one activation value (the compute dtype),
//! `N = b·t` the batch's positions.

use crate::config::TextConfig;
use crate::names::LinearKind;

/// One batch's memory, by part, in the forward/backward of
/// [`crate::TextModel::forward_checkpointed`] + [`crate::TextModel::backward_linears_ce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// The checkpoints a forward keeps: each layer's input, the last residual and the
    /// final hidden states (`N·H` each), the RoPE tables and the masks.
    pub checkpoints: u64,
    /// One decoder layer's working set in the backward: its recomputed activations, its
    /// attention probabilities and their gradients, its Linears' output gradients, the
    /// residual gradient and the transients of the products (one Linear's packed f32
    /// weight).
    pub layer: u64,
    /// The head's working set that does not depend on the chunk: its packed f32 weight
    /// and dL/dhidden of the whole batch.
    pub head_fixed: u64,
    /// The head's working set per position in a chunk: the chunk's logits and their
    /// gradient (two `[rows, V]`, plus the scaled copy when a batch is sliced).
    pub head_per_row: u64,
    /// The largest input plus output of one Linear for the batch, in f32 — what a user of
    /// the backward's per-Linear callback copies or quantizes per Linear.
    pub linear_io: u64,
}

impl Needs {
    /// The head's working set for chunks of `rows` positions.
    pub fn head(&self, rows: usize) -> u64 {
        self.head_fixed + rows as u64 * self.head_per_row
    }
}

/// [`Needs`] of a `[b, t]` batch with activations of `act` bytes.
pub fn needs(c: &TextConfig, b: usize, t: usize, act: usize) -> Needs {
    let n = (b * t) as u64;
    let act = act as u64;
    let (h, i, v) = (c.hidden_size as u64, c.intermediate_size as u64, c.vocab_size as u64);
    let (q, kv) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    let probs = (b * c.num_attention_heads * t * t) as u64;
    let checkpoints =
        act * ((c.num_hidden_layers as u64 + 2) * n * h + 2 * t as u64 * c.head_dim as u64 + n * (t as u64 + 1));
    // Kept activations (x, q/k raw, v, h_mid, gate, up, o_out, mlp_out), the rotated q and
    // k, the seven output gradients, dh/dact/dn2 transients, the recomputed input a sink
    // sees, and four attention-sized tensors (p, dp, the softmax gradient and its scaled
    // copy; the recomputation's scores and probabilities are fewer).
    let acts = n * (4 * h + q + 2 * kv + 2 * i);
    let rotated = n * (q + kv);
    let grads = n * (q + 2 * kv + 2 * h + 2 * i);
    let transients = n * (2 * i + 2 * h + i.max(q));
    let layer_values = acts + rotated + grads + transients + 4 * probs;
    let widest = LinearKind::ALL.iter().map(|k| k.shape(c)).map(|(o, i)| (o * i) as u64).max().unwrap_or(0);
    let layer = act * layer_values + 4 * widest;
    Needs {
        checkpoints,
        layer,
        head_fixed: 4 * v * h + act * 2 * n * h,
        head_per_row: 3 * act.max(4) * v,
        linear_io: 4 * n * LinearKind::ALL.iter().map(|k| k.shape(c)).map(|(o, i)| (o + i) as u64).max().unwrap_or(0),
    }
}

/// Bytes the weights take with matrices stored in `matrix` bytes per value and norms in
/// `act` (see [`crate::weights`]).
pub fn weight_bytes(c: &TextConfig, matrix: usize, act: usize) -> u64 {
    let norms = c.num_hidden_layers as u64 * (2 * c.hidden_size + 2 * c.head_dim) as u64 + c.hidden_size as u64;
    (c.params() - norms) * matrix as u64 + norms * act as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen3-VL-4B's language model.
    fn qwen3_vl_4b() -> TextConfig {
        let mut c = TextConfig::synthetic(2560, 36, 32, 8, 9728, 151_936);
        c.head_dim = 128;
        c.tie_word_embeddings = true;
        c
    }

    #[test]
    fn the_parts_by_hand_on_a_small_shape() {
        let mut c = TextConfig::synthetic(8, 3, 2, 1, 16, 32);
        c.head_dim = 4;
        let n = needs(&c, 2, 5, 4);
        // 5 residual-sized tensors of 10×8, RoPE 2·5·4, masks 2·5·6
        assert_eq!(n.checkpoints, 4 * (5 * 10 * 8 + 40 + 60));
        // head: packed 32×8 f32 + 2 × N·H; per row 3 × 32 f32
        assert_eq!((n.head_fixed, n.head_per_row), (4 * 32 * 8 + 4 * 2 * 10 * 8, 3 * 4 * 32));
        assert_eq!(n.head(7), n.head_fixed + 7 * n.head_per_row);
        // gate/up/down: 16 + 8 features
        assert_eq!(n.linear_io, 4 * 10 * 24);
        // layer: acts 10·(32+8+8+32) + rotated 10·12 + grads 10·(8+8+16+32) + transients
        // 10·(32+16+16) + 4 probs of 2·2·25, and the widest weight (16×8) packed in f32
        let values = 10 * 80 + 10 * 12 + 10 * 64 + 10 * 64 + 4 * 100;
        assert_eq!(n.layer, 4 * values + 4 * 128);
    }

    #[test]
    fn the_4b_model_at_8_by_512_fits_a_24_gib_gpu_in_bf16() {
        let c = qwen3_vl_4b();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let w = weight_bytes(&c, 2, 2);
        assert!((gib(w) - 7.49).abs() < 0.02, "{:.2} GiB", gib(w));
        let n = needs(&c, 8, 512, 2);
        // checkpoints: 38 × 4096 × 2560 bf16 ≈ 0.74 GiB
        assert!((gib(n.checkpoints) - 0.75).abs() < 0.02, "{:.2}", gib(n.checkpoints));
        let head = n.head(1024);
        let total = w + n.checkpoints + n.layer.max(head);
        eprintln!(
            "4B bf16 8×512: weights {:.2} + checkpoints {:.2} + max(layer {:.2}, head@1024 {:.2}) = {:.2} GiB",
            gib(w),
            gib(n.checkpoints),
            gib(n.layer),
            gib(head),
            gib(total)
        );
        assert!(total < 24 << 30, "{:.1} GiB", gib(total));
        // The CPU plan in f32 with bf16 weights: within the 12 GiB the issue sets.
        let n = needs(&c, 8, 512, 4);
        let total = weight_bytes(&c, 2, 4) + n.checkpoints + n.layer.max(n.head(512));
        assert!(total < 12 << 30, "{:.1} GiB", gib(total));
    }
}
