//! Recipes: which linears share a quantization decision, what each is called, and what it
//! costs — ModelOpt `auto_quantize`'s grouping rules for a Qwen3-style language model.
//!
//! * `…q_proj`, `…k_proj`, `…v_proj` of one attention block share one recipe, named after
//!   the first member met in module order (`q_proj`): `layers.N.self_attn.q_proj.quant_recipe`.
//! * `…gate_proj` and `…up_proj` of one MLP share one (`layers.N.mlp.gate_proj.quant_recipe`).
//! * every other linear (`o_proj`, `down_proj`) is its own recipe.
//!
//! Recipes come out in the order ModelOpt's `named_hparams(unique=True)` yields them: the
//! module order of the model, each group at its first member.
//!
//! Cost of a recipe under a format = Σ member weight elements × effective bits / 16
//! (NONE: × 16 / 16), as `QuantRecipeHparam.get_cost` computes it.

use std::collections::HashMap;

/// One linear of the language model, as the scorer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearInfo {
    /// Name relative to the language model, e.g. `layers.0.self_attn.q_proj`.
    pub name: String,
    /// Number of weight elements (out × in).
    pub weight_numel: usize,
}

/// A group of linears that takes one quantization decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// `<first member>.quant_recipe`.
    pub name: String,
    /// Member linears, in module order.
    pub members: Vec<String>,
    /// Σ member weight elements.
    pub weight_numel: usize,
}

impl Recipe {
    /// ModelOpt's cost of this recipe at `effective_bits`: weight elements × bits / 16.
    pub fn cost(&self, effective_bits: f64) -> f64 {
        self.weight_numel as f64 * (effective_bits / 16.0)
    }
}

/// The group key of one linear, following ModelOpt's `quant_grouping_rules` that apply to a
/// dense Qwen3 language model (`^(.*?)\.(q_proj|k_proj|v_proj)$`, `^(.*?)\.(gate_proj|up_proj)$`).
pub fn group_key(name: &str) -> String {
    if let Some((prefix, last)) = name.rsplit_once('.') {
        if matches!(last, "q_proj" | "k_proj" | "v_proj") {
            return format!("{prefix}/qkv");
        }
        if matches!(last, "gate_proj" | "up_proj") {
            return format!("{prefix}/gate_up");
        }
    }
    name.to_string()
}

/// Group `linears` (in module order) into recipes, in ModelOpt's order.
pub fn group(linears: &[LinearInfo]) -> Vec<Recipe> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Recipe> = Vec::new();
    for l in linears {
        let key = group_key(&l.name);
        match index.get(&key) {
            Some(&i) => {
                out[i].members.push(l.name.clone());
                out[i].weight_numel += l.weight_numel;
            }
            None => {
                index.insert(key, out.len());
                out.push(Recipe {
                    name: format!("{}.quant_recipe", l.name),
                    members: vec![l.name.clone()],
                    weight_numel: l.weight_numel,
                });
            }
        }
    }
    out
}

/// `NAME(effective-bits: B)` as ModelOpt prints a `QuantRecipe` (Python's `str(float)`, which
/// for bit counts — 4.0, 4.5, 8.0, 16.0 — is Rust's shortest round-trip `{:?}`).
pub fn display_name(name: &str, effective_bits: f64) -> String {
    format!("{name}(effective-bits: {effective_bits:?})")
}

/// The display of the implicit no-quantization choice.
pub fn none_display() -> String {
    display_name("NONE", 16.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lm(layers: usize) -> Vec<LinearInfo> {
        let mut v = Vec::new();
        for l in 0..layers {
            for (m, n) in [
                ("self_attn.q_proj", 8),
                ("self_attn.k_proj", 4),
                ("self_attn.v_proj", 4),
                ("self_attn.o_proj", 8),
                ("mlp.gate_proj", 16),
                ("mlp.up_proj", 16),
                ("mlp.down_proj", 16),
            ] {
                v.push(LinearInfo { name: format!("layers.{l}.{m}"), weight_numel: n });
            }
        }
        v
    }

    #[test]
    fn groups_like_modelopt() {
        let r = group(&lm(2));
        let names: Vec<_> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layers.0.self_attn.q_proj.quant_recipe",
                "layers.0.self_attn.o_proj.quant_recipe",
                "layers.0.mlp.gate_proj.quant_recipe",
                "layers.0.mlp.down_proj.quant_recipe",
                "layers.1.self_attn.q_proj.quant_recipe",
                "layers.1.self_attn.o_proj.quant_recipe",
                "layers.1.mlp.gate_proj.quant_recipe",
                "layers.1.mlp.down_proj.quant_recipe",
            ]
        );
        assert_eq!(
            r[0].members,
            ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"]
        );
        assert_eq!(r[0].weight_numel, 16);
        assert_eq!(r[2].members, ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]);
        assert_eq!(r[2].cost(8.0), 16.0);
        assert_eq!(r[2].cost(16.0), 32.0);
    }

    #[test]
    fn display_matches_python() {
        assert_eq!(display_name("INT8_DEFAULT_CFG", 8.0), "INT8_DEFAULT_CFG(effective-bits: 8.0)");
        assert_eq!(display_name("NVFP4_DEFAULT_CFG", 4.5), "NVFP4_DEFAULT_CFG(effective-bits: 4.5)");
        assert_eq!(none_display(), "NONE(effective-bits: 16.0)");
    }
}
