//! Stable names and indices of the hookable Linears.
//!
//! Linear `idx = layer * 7 + kind as usize`, in module order per layer:
//! q, k, v, o, gate, up, down — the order ModelOpt and the legacy manifests list them
//! (`layers.0.self_attn.q_proj`, …, `layers.0.mlp.down_proj`, `layers.1.…`). Names are
//! relative to the language model. `lm_head` is not hookable.

use crate::config::TextConfig;

pub const LINEARS_PER_LAYER: usize = 7;

/// One of the seven Linears of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
    Gate = 4,
    Up = 5,
    Down = 6,
}

impl LinearKind {
    pub const ALL: [LinearKind; LINEARS_PER_LAYER] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// Module path inside a decoder layer, e.g. `self_attn.q_proj`, `mlp.down_proj`.
    pub fn suffix(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    /// Weight shape `(out_features, in_features)`.
    pub fn shape(self, c: &TextConfig) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        match self {
            LinearKind::Q => (q, h),
            LinearKind::K | LinearKind::V => (kv, h),
            LinearKind::O => (h, q),
            LinearKind::Gate | LinearKind::Up => (i, h),
            LinearKind::Down => (h, i),
        }
    }
}

/// `(layer, kind)` of linear `idx`.
pub fn linear_at(idx: usize) -> (usize, LinearKind) {
    (idx / LINEARS_PER_LAYER, LinearKind::ALL[idx % LINEARS_PER_LAYER])
}

/// Index of `(layer, kind)`.
pub fn linear_index(layer: usize, kind: LinearKind) -> usize {
    layer * LINEARS_PER_LAYER + kind as usize
}

/// `layers.{layer}.{suffix}`.
pub fn linear_name(layer: usize, kind: LinearKind) -> String {
    format!("layers.{layer}.{}", kind.suffix())
}

/// All hookable Linear names of a model with `num_layers` layers, in module order.
pub fn linear_names(num_layers: usize) -> Vec<String> {
    (0..num_layers * LINEARS_PER_LAYER)
        .map(|i| {
            let (l, k) = linear_at(i);
            linear_name(l, k)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_module_order() {
        let n = linear_names(2);
        assert_eq!(n.len(), 14);
        assert_eq!(n[0], "layers.0.self_attn.q_proj");
        assert_eq!(n[3], "layers.0.self_attn.o_proj");
        assert_eq!(n[4], "layers.0.mlp.gate_proj");
        assert_eq!(n[6], "layers.0.mlp.down_proj");
        assert_eq!(n[7], "layers.1.self_attn.q_proj");
        assert_eq!(linear_at(12), (1, LinearKind::Up));
        assert_eq!(linear_index(1, LinearKind::Up), 12);
    }
}
