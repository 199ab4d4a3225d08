//! The language-model part of a Qwen3-VL `config.json`, in either dialect transformers
//! writes:
//!
//! * **5.x** — `text_config.rope_parameters = {rope_theta, mrope_section, mrope_interleaved,
//!   rope_type}` (the committed tiny checkpoint);
//! * **4.57** — `text_config.rope_theta` plus `text_config.rope_scaling = {mrope_section,
//!   mrope_interleaved, rope_type}` (Qwen/Qwen3-VL-4B-Instruct on the Hub).
//!
//! candle-transformers' `qwen3_vl::config::TextConfig` wants `rope_theta` and
//! `tie_word_embeddings` inside `text_config`, which the 5.x dialect does not have, so the
//! fields are read here by hand with errors that name the missing key.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// Which config.json dialect a checkpoint was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigDialect {
    /// transformers 5.x: `rope_parameters`.
    Transformers5,
    /// transformers 4.57: `rope_theta` + `rope_scaling`.
    Transformers457,
}

/// Hyper-parameters of the Qwen3-VL text model (everything the forward pass needs).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// MRoPE split of the rotary half-dimension over (t, h, w). With text-only input all
    /// three axes carry the same positions, so the split does not change the result.
    pub mrope_section: Vec<usize>,
    pub mrope_interleaved: bool,
    /// `tie_word_embeddings` from the top level or `text_config` (top level wins);
    /// `false` when absent. A checkpoint without `lm_head.weight` is tied regardless.
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    pub dialect: ConfigDialect,
}

fn field<'a>(obj: &'a Map<String, Value>, prefix: &str, key: &str) -> Result<&'a Value> {
    obj.get(key).with_context(|| format!("missing field `{prefix}{key}`"))
}

fn usize_field(obj: &Map<String, Value>, prefix: &str, key: &str) -> Result<usize> {
    let v = field(obj, prefix, key)?;
    v.as_u64()
        .map(|n| n as usize)
        .with_context(|| format!("field `{prefix}{key}` must be a non-negative integer, found {v}"))
}

fn f64_field(obj: &Map<String, Value>, prefix: &str, key: &str) -> Result<f64> {
    let v = field(obj, prefix, key)?;
    v.as_f64().with_context(|| format!("field `{prefix}{key}` must be a number, found {v}"))
}

/// The language model's section of a `config.json`: `text_config` in a full Qwen3-VL
/// config, else the root itself when it is a bare text config (it has `hidden_size`).
/// Returns the section and the prefix that names its fields in errors (`text_config.`).
pub fn text_section(root: &Value) -> Result<(&Map<String, Value>, &'static str)> {
    let root = object(root, "<root>")?;
    match root.get("text_config") {
        Some(tc) => Ok((object(tc, "text_config")?, "text_config.")),
        None if root.contains_key("hidden_size") => Ok((root, "")),
        None => bail!("missing field `text_config` (expected a Qwen3-VL config.json)"),
    }
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>> {
    v.as_object().with_context(|| format!("field `{what}` must be an object"))
}

/// Reads `mrope_section` / `mrope_interleaved` / `rope_type` from a rope dict.
fn mrope_fields(rope: &Map<String, Value>, prefix: &str) -> Result<(Vec<usize>, bool)> {
    if let Some(rt) = rope.get("rope_type").or_else(|| rope.get("type")) {
        let rt = rt.as_str().unwrap_or_default();
        if rt != "default" && rt != "mrope" {
            bail!("field `{prefix}rope_type` is {rt:?}; only the \"default\" rotary embedding is supported");
        }
    }
    let section = match rope.get("mrope_section") {
        Some(v) => serde_json::from_value::<Vec<usize>>(v.clone())
            .with_context(|| format!("field `{prefix}mrope_section` must be a list of integers, found {v}"))?,
        None => Vec::new(),
    };
    let interleaved = rope.get("mrope_interleaved").and_then(Value::as_bool).unwrap_or(false);
    Ok((section, interleaved))
}

impl TextConfig {
    /// Parameters of the language model (norms included; `lm_head` once more when untied).
    pub fn params(&self) -> u64 {
        let (h, i, v) = (self.hidden_size as u64, self.intermediate_size as u64, self.vocab_size as u64);
        let (q, kv) =
            ((self.num_attention_heads * self.head_dim) as u64, (self.num_key_value_heads * self.head_dim) as u64);
        let per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h + 2 * self.head_dim as u64;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        heads * v * h + self.num_hidden_layers as u64 * per_layer + h
    }

    /// Reads `config.json` from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is this a Qwen3-VL checkpoint folder?)", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses a full Qwen3-VL config (`text_config` inside) or a bare text config.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        Self::from_value(&root)
    }

    pub fn from_value(root: &Value) -> Result<Self> {
        let (tc, prefix) = text_section(root)?;
        let root = object(root, "<root>")?;
        let hidden_size = usize_field(tc, prefix, "hidden_size")?;
        let num_attention_heads = usize_field(tc, prefix, "num_attention_heads")?;
        let head_dim = match tc.get("head_dim") {
            Some(Value::Null) | None => hidden_size / num_attention_heads.max(1),
            Some(_) => usize_field(tc, prefix, "head_dim")?,
        };
        if let Some(act) = tc.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("field `{prefix}hidden_act` is {act:?}; the Qwen3-VL text MLP here supports \"silu\" only");
            }
        }
        if tc.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            bail!("field `{prefix}attention_bias` is true; biased attention projections are not supported");
        }

        let (dialect, rope_theta, (mrope_section, mrope_interleaved)) = if let Some(rp) = tc.get("rope_parameters") {
            let rp_prefix = format!("{prefix}rope_parameters.");
            let rp = object(rp, &format!("{prefix}rope_parameters"))?;
            (ConfigDialect::Transformers5, f64_field(rp, &rp_prefix, "rope_theta")?, mrope_fields(rp, &rp_prefix)?)
        } else if tc.contains_key("rope_theta") || tc.contains_key("rope_scaling") {
            let theta = f64_field(tc, prefix, "rope_theta")
                .context("transformers 4.57 dialect (`rope_scaling` present) needs `rope_theta`")?;
            let mrope = match tc.get("rope_scaling") {
                Some(Value::Null) | None => (Vec::new(), false),
                Some(rs) => {
                    mrope_fields(object(rs, &format!("{prefix}rope_scaling"))?, &format!("{prefix}rope_scaling."))?
                }
            };
            (ConfigDialect::Transformers457, theta, mrope)
        } else {
            bail!(
                "missing field `{prefix}rope_parameters` (transformers 5.x dialect) or `{prefix}rope_theta` \
                 (transformers 4.57 dialect): cannot tell the rotary embedding's base"
            );
        };

        let head_half = head_dim / 2;
        if !mrope_section.is_empty() && mrope_section.iter().sum::<usize>() != head_half {
            bail!(
                "field `mrope_section` {mrope_section:?} sums to {}, expected head_dim/2 = {head_half}",
                mrope_section.iter().sum::<usize>()
            );
        }

        let tie = root
            .get("tie_word_embeddings")
            .or_else(|| tc.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let pad_token_id =
            tc.get("pad_token_id").or_else(|| root.get("pad_token_id")).and_then(Value::as_u64).map(|v| v as u32);

        let cfg = TextConfig {
            vocab_size: usize_field(tc, prefix, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_field(tc, prefix, "intermediate_size")?,
            num_hidden_layers: usize_field(tc, prefix, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: usize_field(tc, prefix, "num_key_value_heads")?,
            head_dim,
            max_position_embeddings: usize_field(tc, prefix, "max_position_embeddings")?,
            rms_norm_eps: f64_field(tc, prefix, "rms_norm_eps")?,
            rope_theta,
            mrope_section,
            mrope_interleaved,
            tie_word_embeddings: tie,
            pad_token_id,
            dialect,
        };
        if cfg.num_key_value_heads == 0 || !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
            bail!(
                "field `{prefix}num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                cfg.num_attention_heads,
                cfg.num_key_value_heads
            );
        }
        if !cfg.head_dim.is_multiple_of(2) {
            bail!("field `{prefix}head_dim` ({}) must be even for rotary embeddings", cfg.head_dim);
        }
        Ok(cfg)
    }

    /// Query heads per key/value head (GQA group size).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

impl TextConfig {
    /// A text config of the given size (head_dim 64, rope θ 5e6, eps 1e-6, untied
    /// `lm_head`, `max_position_embeddings` 4096) — for synthetic models.
    pub fn synthetic(
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
        vocab: usize,
    ) -> Self {
        TextConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-6,
            rope_theta: 5e6,
            mrope_section: Vec::new(),
            mrope_interleaved: false,
            tie_word_embeddings: false,
            pad_token_id: Some(0),
            dialect: ConfigDialect::Transformers5,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn v5() -> Value {
        json!({
            "tie_word_embeddings": true,
            "text_config": {
                "head_dim": 32, "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 384,
                "max_position_embeddings": 1024, "num_attention_heads": 4, "num_hidden_layers": 4,
                "num_key_value_heads": 2, "pad_token_id": 0, "rms_norm_eps": 1e-6, "vocab_size": 512,
                "rope_parameters": {"mrope_interleaved": true, "mrope_section": [6, 5, 5],
                                    "rope_theta": 5000000.0, "rope_type": "default"}
            }
        })
    }

    /// The same config in the 4.57 dialect.
    pub(crate) fn to_457(mut v: Value) -> Value {
        let tc = v["text_config"].as_object_mut().unwrap();
        let mut rp = tc.remove("rope_parameters").unwrap();
        let theta = rp.as_object_mut().unwrap().remove("rope_theta").unwrap();
        tc.insert("rope_theta".into(), theta);
        tc.insert("rope_scaling".into(), rp);
        v
    }

    #[test]
    fn both_dialects_give_the_same_config() {
        let a = TextConfig::from_value(&v5()).unwrap();
        let b = TextConfig::from_value(&to_457(v5())).unwrap();
        assert_eq!(a.dialect, ConfigDialect::Transformers5);
        assert_eq!(b.dialect, ConfigDialect::Transformers457);
        assert_eq!(TextConfig { dialect: a.dialect, ..b.clone() }, a);
        assert_eq!(a.rope_theta, 5e6);
        assert_eq!(a.mrope_section, vec![6, 5, 5]);
        assert!(a.tie_word_embeddings && a.mrope_interleaved);
        assert_eq!(a.group_size(), 2);
    }

    #[test]
    fn unknown_dialect_names_the_missing_field() {
        let mut v = v5();
        v["text_config"].as_object_mut().unwrap().remove("rope_parameters");
        let err = format!("{:#}", TextConfig::from_value(&v).unwrap_err());
        assert!(err.contains("text_config.rope_parameters"), "{err}");

        let mut v = to_457(v5());
        v["text_config"].as_object_mut().unwrap().remove("rope_theta");
        let err = format!("{:#}", TextConfig::from_value(&v).unwrap_err());
        assert!(err.contains("text_config.rope_theta"), "{err}");

        let mut v = v5();
        v["text_config"]["rope_parameters"].as_object_mut().unwrap().remove("rope_theta");
        let err = format!("{:#}", TextConfig::from_value(&v).unwrap_err());
        assert!(err.contains("text_config.rope_parameters.rope_theta"), "{err}");

        let mut v = v5();
        v["text_config"].as_object_mut().unwrap().remove("hidden_size");
        let err = format!("{:#}", TextConfig::from_value(&v).unwrap_err());
        assert!(err.contains("text_config.hidden_size"), "{err}");
    }

    #[test]
    fn committed_tiny_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny_qwen3_vl/checkpoint");
        let c = TextConfig::from_dir(&dir).unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.head_dim, c.vocab_size), (128, 4, 32, 516));
        assert_eq!(c.pad_token_id, Some(0));
    }
}
