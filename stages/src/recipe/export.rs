//! Deployment configs from a mixed-precision recipe: one quantization format (or none) per
//! recipe group of Linear layers, turned into
//!
//! - [`modelopt_config`]: a config for NVIDIA ModelOpt 0.47's
//!   `mtq.quantize(model, cfg, forward_loop)` on the whole transformers model;
//! - [`llm_compressor_recipe`]: an llm-compressor recipe (YAML) with one `QuantizationModifier`
//!   whose `config_groups` hold compressed-tensors `QuantizationArgs`, plus the groups whose
//!   format compressed-tensors cannot express ([`Unsupported`], never dropped silently);
//! - [`recipe_expectations`]: what every module's quantizers must be once either export is
//!   applied, for `scripts/check_recipe_exports.py` (`export_expectations.json`).
//!
//! # ModelOpt 0.47
//!
//! `quant_cfg` is an ordered list of `QuantizerCfgEntry` dicts
//! (`modelopt/torch/quantization/config.py`: `QuantizerCfgEntry`, `normalize_quant_cfg_list`;
//! the older `{"*weight_quantizer": {...}}` dict form is still accepted but deprecated):
//! `{"quantizer_name": <glob>, "enable": <bool>, "cfg": <QuantizerAttributeConfig>}`.
//! `conversion.py::set_quantizer_by_cfg` applies the entries in order, later ones winning;
//! `_match_quantizer` matches `quantizer_name` with `fnmatch` against the quantizer module's
//! full name in `model.named_modules()`; an entry with `cfg` replaces all attributes (the
//! ones not given revert to `QuantizerAttributeConfig`'s defaults) and `enable` is passed
//! next to `cfg`, never inside it (`QuantizerAttributeConfig(**cfg, enable=enable)`).
//!
//! The config starts with `{"quantizer_name": "*", "enable": false}` (every quantizer of the
//! model off: vision tower, `lm_head`, unchosen layers) and then names each chosen Linear's
//! `weight_quantizer` and `input_quantizer` by its full module name (`LM_PREFIX` + module +
//! `.weight_quantizer`): a name without wildcards matches exactly one module, so
//! `layers.1` never matches `layers.11`.
//!
//! JSON cannot carry ModelOpt's integer `block_sizes` keys: the axis is written `"-1"`, and
//! `QuantizerAttributeConfig.validate_block_sizes` asserts integer keys. Convert digit keys
//! of `block_sizes` to `int` before `mtq.quantize` (`check_recipe_exports.py` does);
//! `num_bits: [4, 3]` lists are accepted as the `(4, 3)` tuples.
//!
//! # llm-compressor / compressed-tensors
//!
//! Recipe schema (llm-compressor `Recipe.from_dict`): `<name>_stage: <group>_modifiers:
//! QuantizationModifier: {ignore, config_groups: {group_i: {targets, weights,
//! input_activations}}}`; `weights` / `input_activations` are compressed-tensors
//! `QuantizationArgs` (`num_bits`, `type: int|float`, `symmetric`, `strategy:
//! tensor|channel|group|block|token|tensor_group`, `group_size`, `dynamic: false|true|local`,
//! `scale_dtype`, `observer`). A target `re:<regex>` is matched with `re.match` against the
//! module's full name (compressed-tensors `utils/match.py::match_name`); each target here is
//! anchored with `$` and names one module, written so that it matches both transformers'
//! `model.language_model.layers.N…` and vLLM's `language_model.model.layers.N…` (vLLM
//! remaps plain names of a checkpoint's config, not regexes).
//!
//! Mapping of qpipe's quantizers (all symmetric):
//!
//! | qpipe / ModelOpt | weights | input activations |
//! |---|---|---|
//! | INT / FP8 per tensor (`axis: null`) | `strategy: tensor` | static: `tensor` + `observer: static_minmax` (ModelOpt's max calibration); dynamic: `tensor`, `dynamic: true` |
//! | per output channel (`axis: 0`) | `channel` | — |
//! | per token (`block_sizes: {-1: null}`, dynamic) | `channel` | `token`, `dynamic: true` |
//! | INT / FP8 blocks of n (`block_sizes: {-1: n}`) | `group`, `group_size: n` | dynamic: `group`, `dynamic: true` |
//! | NVFP4 (E2M1, dynamic blocks of 16, E4M3 scales) | `float` 4, `tensor_group` 16, `scale_dtype: float8_e4m3fn` | same, `dynamic: local` (calibrated global scale) |
//! | MXFP4 / MXFP8 (E2M1 / E4M3, blocks of 32, E8M0 scales) | `float` 4 / 8, `group` 32, `scale_dtype: uint8` | same, `dynamic: true` |
//!
//! Not expressible (→ [`Unsupported`]): per-input-channel scales (`axis: 1` / `-1`),
//! unsigned integer grids, static per-block activation ranges, NVFP4-style blocks other than
//! 16 (e.g. `W4A8_NVFP4_FP8_CFG`'s FP4 blocks of 32 with E4M3 scales: compressed-tensors
//! takes FP4 groups of 32 for MXFP4 with E8M0 scales), MX blocks other than 32, and float
//! formats other than E4M3 / E2M1. INT4 activations are expressible (`num_bits: 4, type:
//! int`; compressed-tensors ships W4A4-style presets) and are exported.
//!
//! Only the format is exported, not ModelOpt's arithmetic: each library calibrates with its
//! own rules (e.g. compressed-tensors' symmetric INT8 scale is `amax / 127.5`, ModelOpt's
//! `amax / 127`; `narrow_range` has no equivalent and is not written). Weight quantizers
//! marked `type: dynamic` in ModelOpt are written `dynamic: false`: a weight's scales come
//! from the weight either way.

use qpipe_quant::{AmaxKind, NumBits, QuantConfig, QuantizerSpec, Role, Scheme};
use serde_json::{json, Map, Value};

/// One recipe group's choice.
#[derive(Clone, Copy, Debug)]
pub struct LayerChoice<'a> {
    /// Recipe group name without `.quant_recipe`, e.g. `layers.0.self_attn.q_proj`.
    pub group: &'a str,
    /// Its Linear modules relative to the language model, e.g. `layers.0.self_attn.k_proj`.
    pub modules: &'a [String],
    /// `None` = not quantized; else (pair name e.g. `wint8_aint8`, its format).
    pub format: Option<(&'a str, &'a QuantConfig)>,
}

/// Prefix of the language model's modules in the whole transformers model.
pub const LM_PREFIX: &str = "model.language_model.";

// ---------------------------------------------------------------------------------------
// ModelOpt 0.47
// ---------------------------------------------------------------------------------------

/// `{"quant_cfg": [...], "algorithm": "max"}` for `mtq.quantize(model, cfg, forward_loop)`
/// on the whole transformers model: every quantizer off, then, per module of each chosen
/// group in order, its `weight_quantizer` and `input_quantizer` entries (the format's
/// attributes, or `enable: false` for a quantizer the format leaves off).
///
/// `block_sizes` keys are strings (`"-1"`) in JSON; see the module docs.
pub fn modelopt_config(layers: &[LayerChoice<'_>]) -> Value {
    let mut quant_cfg = vec![json!({"quantizer_name": "*", "enable": false})];
    for layer in layers {
        let Some((_, cfg)) = layer.format else { continue };
        for module in layer.modules {
            for (role, spec) in [(Role::Weight, &cfg.weight), (Role::Input, &cfg.input)] {
                let name = modelopt_quantizer_name(module, role);
                quant_cfg.push(if spec.enable {
                    json!({"quantizer_name": name, "enable": true, "cfg": Value::Object(quantizer_attributes(spec))})
                } else {
                    json!({"quantizer_name": name, "enable": false})
                });
            }
        }
    }
    json!({"quant_cfg": quant_cfg, "algorithm": "max"})
}

/// The `quantizer_name` of `module`'s weight or input quantizer: its full name in the
/// whole model, with `fnmatch`'s special characters escaped (module names have none).
pub fn modelopt_quantizer_name(module: &str, role: Role) -> String {
    let quantizer = match role {
        Role::Weight => "weight_quantizer",
        Role::Input => "input_quantizer",
    };
    glob_escape(&format!("{LM_PREFIX}{module}.{quantizer}"))
}

/// `fnmatch` pattern matching exactly `name`: `*`, `?` and `[` become one-character sets.
fn glob_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '*' | '?' | '[' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    out
}

/// The ModelOpt attribute dict of an enabled quantizer, without `enable`: the inverse of
/// [`QuantizerSpec::from_attributes`] (`from_attributes(quantizer_attributes(s)) == s` for
/// every valid spec with `enable: true`). Keys as ModelOpt's presets write them: `num_bits`,
/// then `axis` or `block_sizes`, then the non-default `type`, `unsigned`, `narrow_range`,
/// `effective_bits`.
fn quantizer_attributes(spec: &QuantizerSpec) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("num_bits".into(), num_bits_value(spec.num_bits));
    match &spec.block_sizes {
        None => {
            m.insert("axis".into(), spec.axis.map_or(Value::Null, Value::from));
        }
        Some(bs) => {
            let mut b = Map::new();
            b.insert("-1".into(), bs.last_dim.map_or(Value::Null, Value::from));
            if bs.last_dim.is_some() || bs.dynamic {
                b.insert("type".into(), json!(if bs.dynamic { "dynamic" } else { "static" }));
            }
            if let Some(s) = bs.scale_bits {
                b.insert("scale_bits".into(), num_bits_value(s));
            }
            m.insert("block_sizes".into(), Value::Object(b));
        }
    }
    if spec.dynamic {
        m.insert("type".into(), json!("dynamic"));
    }
    if spec.unsigned {
        m.insert("unsigned".into(), json!(true));
    }
    if spec.narrow_range {
        m.insert("narrow_range".into(), json!(true));
    }
    if let Some(b) = spec.effective_bits {
        m.insert("effective_bits".into(), json!(b));
    }
    m
}

/// `8` or `[4, 3]`.
fn num_bits_value(n: NumBits) -> Value {
    match n {
        NumBits::Int(b) => json!(b),
        NumBits::Float { e, m } => json!([e, m]),
    }
}

// ---------------------------------------------------------------------------------------
// llm-compressor / compressed-tensors
// ---------------------------------------------------------------------------------------

/// An llm-compressor recipe and the groups it leaves out.
#[derive(Clone, Debug, PartialEq)]
pub struct LlmCompressorRecipe {
    /// The recipe (YAML text): one `QuantizationModifier`, one config group per distinct
    /// format, `ignore` = `lm_head`, the unquantized and the [`Unsupported`] modules.
    pub yaml: String,
    /// Recipe groups whose format compressed-tensors cannot express, in the input's order.
    pub unsupported: Vec<Unsupported>,
}

/// A recipe group left out of the llm-compressor recipe (its modules are in `ignore`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub group: String,
    pub modules: Vec<String>,
    pub pair: String,
    pub format: String,
    pub why: String,
}

/// compressed-tensors' `dynamic`: `false`, `true` or `"local"` (NVFP4 activations: block
/// scales from the tensor at hand, calibrated global scale).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dynamic {
    No,
    Yes,
    Local,
}

/// The compressed-tensors `QuantizationArgs` qpipe writes (always symmetric).
#[derive(Clone, Debug, PartialEq, Eq)]
struct CtArgs {
    num_bits: u8,
    float: bool,
    strategy: &'static str,
    group_size: Option<usize>,
    dynamic: Dynamic,
    scale_dtype: Option<&'static str>,
    observer: Option<&'static str>,
}

impl CtArgs {
    fn new(num_bits: u8, float: bool, strategy: &'static str) -> Self {
        Self { num_bits, float, strategy, group_size: None, dynamic: Dynamic::No, scale_dtype: None, observer: None }
    }

    fn type_name(&self) -> &'static str {
        if self.float {
            "float"
        } else {
            "int"
        }
    }

    fn dynamic_value(&self) -> Value {
        match self.dynamic {
            Dynamic::No => json!(false),
            Dynamic::Yes => json!(true),
            Dynamic::Local => json!("local"),
        }
    }

    /// The args as a JSON object (the same keys and order as the YAML).
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("num_bits".into(), json!(self.num_bits));
        m.insert("type".into(), json!(self.type_name()));
        m.insert("symmetric".into(), json!(true));
        m.insert("strategy".into(), json!(self.strategy));
        if let Some(g) = self.group_size {
            m.insert("group_size".into(), json!(g));
        }
        m.insert("dynamic".into(), self.dynamic_value());
        if let Some(d) = self.scale_dtype {
            m.insert("scale_dtype".into(), json!(d));
        }
        if let Some(o) = self.observer {
            m.insert("observer".into(), json!(o));
        }
        Value::Object(m)
    }

    /// `key: value` lines at `indent` spaces.
    fn write_yaml(&self, out: &mut String, indent: usize) {
        let Value::Object(m) = self.to_json() else { unreachable!("to_json returns an object") };
        for (k, v) in m {
            let v = match v {
                Value::String(s) => s,
                v => v.to_string(),
            };
            out.push_str(&format!("{:indent$}{k}: {v}\n", ""));
        }
    }
}

/// compressed-tensors' `num_bits` and `type` of an element format.
fn ct_element(elem: NumBits) -> Result<(u8, bool), String> {
    match elem {
        NumBits::Int(b) => Ok((b, false)),
        NumBits::FP8_E4M3 => Ok((8, true)),
        NumBits::FP4_E2M1 => Ok((4, true)),
        e => Err(format!(
            "num_bits {}: compressed-tensors' float type is FP8 E4M3 (num_bits 8) or FP4 E2M1 (num_bits 4) only",
            e.label()
        )),
    }
}

/// The `QuantizationArgs` of one quantizer (`None` = not quantized), or why there are none.
fn ct_args(spec: &QuantizerSpec, scheme: &Scheme, role: Role) -> Result<Option<CtArgs>, String> {
    if !spec.enable || *scheme == Scheme::Off {
        return Ok(None);
    }
    if spec.unsigned {
        return Err("an unsigned integer grid ([0, 2^b - 1], no zero point) has no compressed-tensors equivalent \
                    (signed symmetric, or asymmetric with a calibrated zero point)"
            .into());
    }
    match *scheme {
        Scheme::Off => Ok(None),
        Scheme::Scaled { elem, kind, dynamic } => {
            let (num_bits, float) = ct_element(elem)?;
            let args = |strategy| CtArgs::new(num_bits, float, strategy);
            match (role, kind) {
                (Role::Weight, AmaxKind::PerTensor) => Ok(Some(args("tensor"))),
                (Role::Weight, AmaxKind::PerRow) => Ok(Some(args("channel"))),
                (Role::Weight, AmaxKind::PerBlock(n)) => Ok(Some(CtArgs { group_size: Some(n), ..args("group") })),
                (Role::Weight, AmaxKind::PerCol) => Err("per-input-channel scales (`axis: 1`): compressed-tensors' \
                                                         `channel` strategy is one scale per output channel"
                    .into()),
                (Role::Input, AmaxKind::PerTensor) if dynamic => {
                    Ok(Some(CtArgs { dynamic: Dynamic::Yes, ..args("tensor") }))
                }
                (Role::Input, AmaxKind::PerTensor) => {
                    Ok(Some(CtArgs { observer: Some("static_minmax"), ..args("tensor") }))
                }
                // Per-token ranges are always dynamic (qpipe rejects static ones).
                (Role::Input, AmaxKind::PerRow) => Ok(Some(CtArgs { dynamic: Dynamic::Yes, ..args("token") })),
                (Role::Input, AmaxKind::PerBlock(n)) if dynamic => {
                    Ok(Some(CtArgs { group_size: Some(n), dynamic: Dynamic::Yes, ..args("group") }))
                }
                (Role::Input, AmaxKind::PerBlock(n)) => Err(format!(
                    "static per-block activation ranges (blocks of {n} along each token's row, calibrated): \
                     compressed-tensors' static `group` activation scales are shared by all tokens; use dynamic blocks"
                )),
                (Role::Input, AmaxKind::PerCol) => Err("per-input-channel activation scales (`axis: -1`): \
                                                        compressed-tensors quantizes activations per tensor, token, \
                                                        group, tensor_group or attention head only"
                    .into()),
            }
        }
        Scheme::Nvfp4 { block, global_dynamic } => {
            if block != 16 {
                return Err(format!(
                    "FP4 (E2M1) in blocks of {block} with E4M3 block scales under a per-tensor scale: \
                     compressed-tensors writes this NVFP4 layout as `tensor_group` with group_size 16 only \
                     (its NVFP4 compressor requires 16; FP4 groups of 32 are MXFP4, with E8M0 scales)"
                ));
            }
            let base = CtArgs {
                group_size: Some(16),
                scale_dtype: Some("float8_e4m3fn"),
                ..CtArgs::new(4, true, "tensor_group")
            };
            Ok(Some(match role {
                Role::Weight => base,
                Role::Input if global_dynamic => CtArgs { dynamic: Dynamic::Yes, ..base },
                Role::Input => CtArgs { dynamic: Dynamic::Local, observer: Some("static_minmax"), ..base },
            }))
        }
        Scheme::Mx { elem, block } => {
            if block != 32 {
                let name = if elem == NumBits::FP4_E2M1 { "MXFP4" } else { "MXFP8" };
                return Err(format!(
                    "{name} (E8M0 block scales) in blocks of {block}: compressed-tensors' MXFP4 / MXFP8 use groups \
                     of 32 (the OCP MX block size)"
                ));
            }
            let (num_bits, _) = ct_element(elem)?;
            let base =
                CtArgs { group_size: Some(32), scale_dtype: Some("uint8"), ..CtArgs::new(num_bits, true, "group") };
            Ok(Some(match role {
                Role::Weight => base,
                Role::Input => CtArgs { dynamic: Dynamic::Yes, ..base },
            }))
        }
    }
}

/// `(weights, input_activations)` of a format, or why compressed-tensors cannot express it.
fn ct_scheme(cfg: &QuantConfig) -> Result<(Option<CtArgs>, Option<CtArgs>), String> {
    let w = ct_args(&cfg.weight, &cfg.weight_scheme, Role::Weight).map_err(|e| format!("weights: {e}"));
    let i = ct_args(&cfg.input, &cfg.input_scheme, Role::Input).map_err(|e| format!("input activations: {e}"));
    match (w, i) {
        (Ok(w), Ok(i)) => Ok((w, i)),
        (Err(a), Err(b)) => Err(format!("{a}; {b}")),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// The llm-compressor target (also used in `ignore`) naming one language-model module:
/// `re:^(.*\.)?language_model\.(model\.)?layers\.0\.self_attn\.q_proj$`, matching
/// `model.language_model.layers.0.self_attn.q_proj` (transformers) and
/// `language_model.model.layers.0.self_attn.q_proj` (vLLM), and no other module.
pub fn llm_compressor_target(module: &str) -> String {
    format!(r"re:^(.*\.)?language_model\.(model\.)?{}$", regex_escape(module))
}

/// Escapes Python `re` metacharacters.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// YAML single-quoted scalar (backslashes stay literal; `'` doubles).
fn yaml_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One line of comment text.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Appends `item` unless `list` has it.
fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// One config group: a distinct `(weights, input_activations)`.
struct CtGroup {
    weights: Option<CtArgs>,
    inputs: Option<CtArgs>,
    /// `pair: FORMAT` of the recipe groups using it, first-seen order.
    labels: Vec<String>,
    targets: Vec<String>,
}

/// The llm-compressor recipe of `layers`: a `QuantizationModifier` with one config group
/// per distinct compressed-tensors format (`group_0`, … in order of first use), its targets
/// one [`llm_compressor_target`] per module in the input's order; `ignore` = `lm_head`, the
/// modules of unquantized groups and of [`Unsupported`] ones.
pub fn llm_compressor_recipe(layers: &[LayerChoice<'_>]) -> LlmCompressorRecipe {
    let mut groups: Vec<CtGroup> = Vec::new();
    let mut ignore: Vec<String> = vec!["lm_head".into()];
    let mut unsupported = Vec::new();
    for layer in layers {
        let targets = layer.modules.iter().map(|m| llm_compressor_target(m));
        let Some((pair, cfg)) = layer.format else {
            targets.for_each(|t| push_unique(&mut ignore, t));
            continue;
        };
        match ct_scheme(cfg) {
            Err(why) => {
                unsupported.push(Unsupported {
                    group: layer.group.to_string(),
                    modules: layer.modules.to_vec(),
                    pair: pair.to_string(),
                    format: cfg.format_name.clone(),
                    why,
                });
                targets.for_each(|t| push_unique(&mut ignore, t));
            }
            Ok((None, None)) => targets.for_each(|t| push_unique(&mut ignore, t)),
            Ok((weights, inputs)) => {
                let idx = match groups.iter().position(|g| g.weights == weights && g.inputs == inputs) {
                    Some(i) => i,
                    None => {
                        groups.push(CtGroup { weights, inputs, labels: Vec::new(), targets: Vec::new() });
                        groups.len() - 1
                    }
                };
                let g = &mut groups[idx];
                push_unique(&mut g.labels, format!("{pair}: {}", cfg.format_name));
                targets.for_each(|t| push_unique(&mut g.targets, t));
            }
        }
    }
    groups.retain(|g| !g.targets.is_empty());

    let mut y = String::new();
    y.push_str("# llm-compressor recipe exported by qpipe: one QuantizationModifier, one config group per\n");
    y.push_str("# distinct compressed-tensors format. Each target names one language-model Linear\n");
    y.push_str("# (transformers `model.language_model.layers.N...` or vLLM `language_model.model.layers.N...`).\n");
    y.push_str("# `ignore`: lm_head, the unquantized groups' modules and those of formats compressed-tensors\n");
    y.push_str("# cannot express (returned as `unsupported`).\n");
    y.push_str("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n");
    y.push_str("      ignore:\n");
    for i in &ignore {
        y.push_str(&format!("        - {}\n", yaml_str(i)));
    }
    if groups.is_empty() {
        // Nothing to quantize: no config group, and no default group over every Linear.
        y.push_str("      targets: []\n      config_groups: {}\n");
    } else {
        y.push_str("      config_groups:\n");
        for (n, g) in groups.iter().enumerate() {
            y.push_str(&format!("        group_{n}:\n"));
            for l in &g.labels {
                y.push_str(&format!("          # {}\n", one_line(l)));
            }
            y.push_str("          targets:\n");
            for t in &g.targets {
                y.push_str(&format!("            - {}\n", yaml_str(t)));
            }
            for (key, args) in [("weights", &g.weights), ("input_activations", &g.inputs)] {
                match args {
                    Some(a) => {
                        y.push_str(&format!("          {key}:\n"));
                        a.write_yaml(&mut y, 12);
                    }
                    None => y.push_str(&format!("          {key}: null\n")),
                }
            }
        }
    }
    LlmCompressorRecipe { yaml: y, unsupported }
}

// ---------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------

/// `export_expectations.json` for `scripts/check_recipe_exports.py`: per recipe group, its modules, pair
/// and format, and what each export must do to them:
///
/// - `modelopt`: `{"weight": Q, "input": Q}` with `Q` = `{"enable": false}` or
///   `{"enable": true, <the quantizer's ModelOpt attributes>}`;
/// - `llm_compressor`: `{"weights": A|null, "input_activations": A|null}` with `A` the
///   compressed-tensors args, or `{"unsupported": why}` (then left unquantized).
pub fn recipe_expectations(layers: &[LayerChoice<'_>]) -> Value {
    let quantizer = |spec: &QuantizerSpec| {
        if spec.enable {
            let mut m = Map::new();
            m.insert("enable".into(), json!(true));
            m.extend(quantizer_attributes(spec));
            Value::Object(m)
        } else {
            json!({"enable": false})
        }
    };
    let groups: Vec<Value> = layers
        .iter()
        .map(|layer| {
            let (pair, format, modelopt, lc) = match layer.format {
                None => (
                    Value::Null,
                    Value::Null,
                    json!({"weight": {"enable": false}, "input": {"enable": false}}),
                    json!({"weights": null, "input_activations": null}),
                ),
                Some((pair, cfg)) => (
                    json!(pair),
                    json!(cfg.format_name),
                    json!({"weight": quantizer(&cfg.weight), "input": quantizer(&cfg.input)}),
                    match ct_scheme(cfg) {
                        Ok((w, i)) => json!({
                            "weights": w.as_ref().map(CtArgs::to_json),
                            "input_activations": i.as_ref().map(CtArgs::to_json),
                        }),
                        Err(why) => json!({"unsupported": why}),
                    },
                ),
            };
            json!({
                "group": layer.group,
                "modules": layer.modules,
                "pair": pair,
                "format": format,
                "modelopt": modelopt,
                "llm_compressor": lc,
            })
        })
        .collect();
    json!({"format": "qpipe.recipe_export/1", "lm_prefix": LM_PREFIX, "groups": groups})
}

#[cfg(test)]
mod tests {
    use super::*;
    use qpipe_quant::{config_for, known_formats};

    fn cfg(name: &str) -> QuantConfig {
        config_for(name, &Map::new()).unwrap()
    }

    fn cfg_with(name: &str, overlay: Value) -> QuantConfig {
        config_for(name, overlay.as_object().unwrap()).unwrap()
    }

    fn mods(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn entries(v: &Value) -> &Vec<Value> {
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["quant_cfg", "algorithm"]);
        assert_eq!(v["algorithm"], "max");
        v["quant_cfg"].as_array().unwrap()
    }

    /// Python's `fnmatch.fnmatchcase` for `*`, `?` and `[...]` sets (no ranges, no `!`):
    /// enough to check which quantizer names a pattern reaches.
    fn fnmatch(name: &str, pat: &str) -> bool {
        fn go(n: &[char], p: &[char]) -> bool {
            match p.first() {
                None => n.is_empty(),
                Some('*') => (0..=n.len()).any(|i| go(&n[i..], &p[1..])),
                Some('?') => !n.is_empty() && go(&n[1..], &p[1..]),
                Some('[') => {
                    let close = p[2..].iter().position(|&c| c == ']').map(|i| i + 2).expect("closed set");
                    !n.is_empty() && p[1..close].contains(&n[0]) && go(&n[1..], &p[close + 1..])
                }
                Some(&c) => n.first() == Some(&c) && go(&n[1..], &p[1..]),
            }
        }
        go(&name.chars().collect::<Vec<_>>(), &pat.chars().collect::<Vec<_>>())
    }

    /// What `set_quantizer_by_cfg` leaves on the quantizer `name`: the last matching entry
    /// with `cfg` (its attributes) and the last `enable`.
    fn applied(config: &Value, name: &str) -> (bool, Option<Map<String, Value>>) {
        let (mut enable, mut attrs) = (true, None);
        for e in entries(config) {
            if fnmatch(name, e["quantizer_name"].as_str().unwrap()) {
                enable = e["enable"].as_bool().unwrap_or(true);
                if let Some(c) = e.get("cfg") {
                    attrs = Some(c.as_object().unwrap().clone());
                }
            }
        }
        (enable, attrs)
    }

    fn lm_modules(layers: usize) -> Vec<String> {
        let mut v = Vec::new();
        for l in 0..layers {
            for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
                v.push(format!("layers.{l}.{m}"));
            }
            for m in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
                v.push(format!("layers.{l}.{m}"));
            }
        }
        v
    }

    #[test]
    fn quantizer_attributes_invert_from_attributes_for_every_format_and_overlay() {
        let overlays = [
            json!({}),
            json!({"*weight_quantizer": {"axis": null}}),
            json!({"*weight_quantizer": {"axis": 0}}),
            json!({"*weight_quantizer": {"axis": 1}}),
            json!({"*weight_quantizer": {"block_sizes": {"-1": 64}}}),
            json!({"*input_quantizer": {"type": "static", "axis": null}}),
            json!({"*input_quantizer": {"type": "dynamic", "block_sizes": {"-1": null}}}),
            json!({"*weight_quantizer": {"narrow_range": true, "unsigned": true, "num_bits": 4, "axis": 0}}),
        ];
        let mut checked = 0;
        for name in known_formats() {
            for ov in &overlays {
                let Ok(c) = config_for(name, ov.as_object().unwrap()) else { continue };
                for spec in [&c.weight, &c.input].into_iter().filter(|s| s.enable) {
                    let attrs = quantizer_attributes(spec);
                    let back = QuantizerSpec::from_attributes(&attrs).unwrap();
                    assert_eq!(&back, spec, "{name} {ov}: {}", Value::Object(attrs));
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "{checked}");
    }

    #[test]
    fn quantizer_attributes_match_modelopt_047_presets() {
        // `mtq.<NAME>["quant_cfg"]` entries of ModelOpt 0.47 (printed from the installed
        // package), with tuples as lists and the block axis as "-1".
        let want = [
            ("INT8_DEFAULT_CFG", json!({"num_bits": 8, "axis": 0}), Some(json!({"num_bits": 8, "axis": null}))),
            ("INT8_WEIGHT_ONLY_CFG", json!({"num_bits": 8, "axis": 0}), None),
            (
                "FP8_DEFAULT_CFG",
                json!({"num_bits": [4, 3], "axis": null}),
                Some(json!({"num_bits": [4, 3], "axis": null})),
            ),
            (
                "FP8_PER_CHANNEL_PER_TOKEN_CFG",
                json!({"num_bits": [4, 3], "axis": 0}),
                Some(json!({"num_bits": [4, 3], "block_sizes": {"-1": null}, "type": "dynamic"})),
            ),
            (
                "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
                json!({"num_bits": 4, "block_sizes": {"-1": 128, "type": "static"}}),
                None,
            ),
            (
                "NVFP4_DEFAULT_CFG",
                json!({"num_bits": [2, 1], "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": [4, 3]}, "effective_bits": 4.5}),
                Some(
                    json!({"num_bits": [2, 1], "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": [4, 3]}, "effective_bits": 4.5}),
                ),
            ),
            (
                "W4A8_NVFP4_FP8_CFG",
                json!({"num_bits": [2, 1], "block_sizes": {"-1": 32, "type": "dynamic", "scale_bits": [4, 3]}}),
                Some(json!({"num_bits": [4, 3], "axis": null})),
            ),
            (
                "MXFP8_DEFAULT_CFG",
                json!({"num_bits": [4, 3], "block_sizes": {"-1": 32, "type": "dynamic", "scale_bits": [8, 0]}}),
                Some(json!({"num_bits": [4, 3], "block_sizes": {"-1": 32, "type": "dynamic", "scale_bits": [8, 0]}})),
            ),
        ];
        for (name, w, i) in want {
            let c = cfg(name);
            assert_eq!(Value::Object(quantizer_attributes(&c.weight)), w, "{name} weight");
            match i {
                Some(i) => assert_eq!(Value::Object(quantizer_attributes(&c.input)), i, "{name} input"),
                None => assert!(!c.input.enable, "{name}"),
            }
        }
    }

    #[test]
    fn modelopt_config_disables_everything_then_names_each_module_exactly() {
        let int8 = cfg("INT8_DEFAULT_CFG");
        let int4 = cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG");
        let nvfp4 = cfg("NVFP4_DEFAULT_CFG");
        let (g1, g1b, g11, g2) = (
            mods(&["layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj"]),
            mods(&["layers.1.mlp.down_proj"]),
            mods(&["layers.11.self_attn.q_proj", "layers.11.self_attn.k_proj", "layers.11.self_attn.v_proj"]),
            mods(&["layers.2.mlp.gate_proj", "layers.2.mlp.up_proj"]),
        );
        let layers = [
            LayerChoice { group: "layers.1.self_attn.q_proj", modules: &g1, format: Some(("wint8_aint8", &int8)) },
            LayerChoice { group: "layers.1.mlp.down_proj", modules: &g1b, format: Some(("wint4_afp16", &int4)) },
            LayerChoice { group: "layers.11.self_attn.q_proj", modules: &g11, format: None },
            LayerChoice { group: "layers.2.mlp.gate_proj", modules: &g2, format: Some(("wfp4_afp4", &nvfp4)) },
        ];
        let c = modelopt_config(&layers);
        let e = entries(&c);
        // Deny-all first, then weight + input per module of the chosen groups, in order.
        assert_eq!(e[0], json!({"quantizer_name": "*", "enable": false}));
        assert_eq!(e.len(), 1 + 2 * (3 + 1 + 2));
        assert_eq!(
            e[1],
            json!({"quantizer_name": "model.language_model.layers.1.self_attn.q_proj.weight_quantizer",
                   "enable": true, "cfg": {"num_bits": 8, "axis": 0}})
        );
        assert_eq!(
            e[2],
            json!({"quantizer_name": "model.language_model.layers.1.self_attn.q_proj.input_quantizer",
                   "enable": true, "cfg": {"num_bits": 8, "axis": null}})
        );
        assert_eq!(e[5]["quantizer_name"], "model.language_model.layers.1.self_attn.v_proj.weight_quantizer");
        assert_eq!(
            e[7],
            json!({"quantizer_name": "model.language_model.layers.1.mlp.down_proj.weight_quantizer",
                   "enable": true, "cfg": {"num_bits": 4, "block_sizes": {"-1": 128, "type": "static"}}})
        );
        assert_eq!(
            e[8],
            json!({"quantizer_name": "model.language_model.layers.1.mlp.down_proj.input_quantizer", "enable": false})
        );
        assert_eq!(e[12]["quantizer_name"], "model.language_model.layers.2.mlp.up_proj.input_quantizer");
        assert_eq!(e[12]["cfg"]["block_sizes"], json!({"-1": 16, "type": "dynamic", "scale_bits": [4, 3]}));
        // No entry carries `enable` inside `cfg` (ModelOpt passes it next to the cfg).
        assert!(e.iter().all(|x| x.get("cfg").is_none_or(|c| c.get("enable").is_none())));

        // Effect on every quantizer of a 12-layer model, vision tower and lm_head included.
        let mut names: Vec<String> = lm_modules(12).iter().map(|m| format!("{LM_PREFIX}{m}")).collect();
        names.extend(["model.visual.blocks.0.attn.qkv", "model.visual.merger.linear_fc1", "lm_head"].map(String::from));
        for full in &names {
            let m = full.strip_prefix(LM_PREFIX).unwrap_or("");
            let chosen = layers.iter().find(|l| l.modules.iter().any(|x| x == m)).and_then(|l| l.format);
            for (role, q) in [(Role::Weight, "weight_quantizer"), (Role::Input, "input_quantizer")] {
                let (enable, attrs) = applied(&c, &format!("{full}.{q}"));
                let want = chosen.map(|(_, f)| if role == Role::Weight { &f.weight } else { &f.input });
                match want {
                    Some(spec) if spec.enable => {
                        assert!(enable, "{full}.{q}");
                        assert_eq!(attrs.unwrap(), quantizer_attributes(spec), "{full}.{q}");
                    }
                    _ => assert!(!enable, "{full}.{q} must stay off"),
                }
            }
            let (enable, _) = applied(&c, &format!("{full}.output_quantizer"));
            assert!(!enable, "{full}.output_quantizer");
        }
    }

    #[test]
    fn modelopt_names_are_escaped_for_fnmatch() {
        assert_eq!(glob_escape("a.b[0]*?"), "a.b[[]0][*][?]");
        assert!(fnmatch("x.a[0]*", &glob_escape("x.a[0]*")));
        assert!(!fnmatch("x.a0", &glob_escape("x.a[0]")));
        assert_eq!(
            modelopt_quantizer_name("layers.3.mlp.up_proj", Role::Input),
            "model.language_model.layers.3.mlp.up_proj.input_quantizer"
        );
    }

    #[test]
    fn modelopt_config_of_no_choice_disables_everything() {
        let g = mods(&["layers.0.mlp.down_proj"]);
        let c = modelopt_config(&[LayerChoice { group: "layers.0.mlp.down_proj", modules: &g, format: None }]);
        assert_eq!(c, json!({"quant_cfg": [{"quantizer_name": "*", "enable": false}], "algorithm": "max"}));
    }

    fn regex_matches(target: &str, name: &str) -> bool {
        // The targets are `^(.*\.)?language_model\.(model\.)?<escaped module>$`: check by
        // construction rather than with a regex engine.
        let re = target.strip_prefix("re:^(.*\\.)?language_model\\.(model\\.)?").unwrap().strip_suffix('$').unwrap();
        let module = re.replace('\\', "");
        let Some(pos) = name.rfind("language_model.") else { return false };
        let (before, rest) = (&name[..pos], &name[pos + "language_model.".len()..]);
        let before_ok = before.is_empty() || before.ends_with('.');
        before_ok && (rest == module || rest.strip_prefix("model.") == Some(module.as_str()))
    }

    #[test]
    fn llm_compressor_targets_name_one_module_in_both_namings() {
        let t = llm_compressor_target("layers.1.self_attn.q_proj");
        assert_eq!(t, r"re:^(.*\.)?language_model\.(model\.)?layers\.1\.self_attn\.q_proj$");
        assert!(regex_matches(&t, "model.language_model.layers.1.self_attn.q_proj"));
        assert!(regex_matches(&t, "language_model.model.layers.1.self_attn.q_proj"));
        assert!(!regex_matches(&t, "model.language_model.layers.11.self_attn.q_proj"));
        assert!(!regex_matches(&t, "model.language_model.layers.1.self_attn.q_proj.weight"));
        assert!(!regex_matches(&t, "model.xlanguage_model.layers.1.self_attn.q_proj"));
        assert_eq!(regex_escape(r"a.b(c)[d]*+?^$|{e}\"), r"a\.b\(c\)\[d\]\*\+\?\^\$\|\{e\}\\");
        assert_eq!(yaml_str("it's"), "'it''s'");
    }

    fn ct(c: &QuantConfig) -> (Option<Value>, Option<Value>) {
        let (w, i) = ct_scheme(c).unwrap();
        (w.map(|a| a.to_json()), i.map(|a| a.to_json()))
    }

    #[test]
    fn compressed_tensors_args_of_each_expressible_format() {
        let int8_ch = json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel", "dynamic": false});
        let int8_t = json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "tensor", "dynamic": false,
                            "observer": "static_minmax"});
        let int4_t = json!({"num_bits": 4, "type": "int", "symmetric": true, "strategy": "tensor", "dynamic": false,
                            "observer": "static_minmax"});
        let fp8_w = json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": "tensor", "dynamic": false});
        let fp8_a = json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": "tensor", "dynamic": false,
                           "observer": "static_minmax"});
        let int4_g = json!({"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group", "group_size": 128,
                            "dynamic": false});
        let nvfp4_w = json!({"num_bits": 4, "type": "float", "symmetric": true, "strategy": "tensor_group",
                             "group_size": 16, "dynamic": false, "scale_dtype": "float8_e4m3fn"});
        let nvfp4_a = json!({"num_bits": 4, "type": "float", "symmetric": true, "strategy": "tensor_group",
                             "group_size": 16, "dynamic": "local", "scale_dtype": "float8_e4m3fn",
                             "observer": "static_minmax"});
        let mx = |bits: u8, dynamic: bool| {
            json!({"num_bits": bits, "type": "float", "symmetric": true, "strategy": "group", "group_size": 32,
                   "dynamic": dynamic, "scale_dtype": "uint8"})
        };
        let want = [
            ("INT8_DEFAULT_CFG", Some(&int8_ch), Some(&int8_t)),
            ("INT8_WEIGHT_ONLY_CFG", Some(&int8_ch), None),
            ("INT8_WEIGHT_FP8_ACT_CFG", Some(&int8_ch), Some(&fp8_a)),
            ("INT8_WEIGHT_INT4_ACT_CFG", Some(&int8_ch), Some(&int4_t)),
            ("FP8_DEFAULT_CFG", Some(&fp8_w), Some(&fp8_a)),
            ("FP8_WEIGHT_ONLY_CFG", Some(&fp8_w), None),
            ("FP8_WEIGHT_INT8_ACT_CFG", Some(&fp8_w), Some(&int8_t)),
            ("FP8_WEIGHT_INT4_ACT_CFG", Some(&fp8_w), Some(&int4_t)),
            ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", Some(&int4_g), None),
            ("INT4_WEIGHT_FP8_ACT_CFG", Some(&int4_g), Some(&fp8_a)),
            ("INT4_WEIGHT_INT8_ACT_CFG", Some(&int4_g), Some(&int8_t)),
            ("INT4_WEIGHT_INT4_ACT_CFG", Some(&int4_g), Some(&int4_t)),
            ("NVFP4_DEFAULT_CFG", Some(&nvfp4_w), Some(&nvfp4_a)),
            ("W4A16_NVFP4_CFG", Some(&nvfp4_w), None),
            ("NVFP4_WEIGHT_ONLY_CFG", Some(&nvfp4_w), None),
            ("NVFP4_WEIGHT_INT8_ACT_CFG", Some(&nvfp4_w), Some(&int8_t)),
            ("NVFP4_WEIGHT_INT4_ACT_CFG", Some(&nvfp4_w), Some(&int4_t)),
        ];
        for (name, w, i) in want {
            assert_eq!(ct(&cfg(name)), (w.cloned(), i.cloned()), "{name}");
        }
        assert_eq!(ct(&cfg("MXFP4_DEFAULT_CFG")), (Some(mx(4, false)), Some(mx(4, true))));
        assert_eq!(ct(&cfg("MXFP8_DEFAULT_CFG")), (Some(mx(8, false)), Some(mx(8, true))));
        assert_eq!(ct(&cfg("W4A8_MXFP4_FP8_CFG")), (Some(mx(4, false)), Some(fp8_a.clone())));
        let fp8_ch =
            json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel", "dynamic": false});
        let fp8_tok = json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": "token", "dynamic": true});
        assert_eq!(ct(&cfg("FP8_PER_CHANNEL_PER_TOKEN_CFG")), (Some(fp8_ch.clone()), Some(fp8_tok.clone())));
        // Granularity overlays of pipeline.yaml.
        let per_token = json!({"*input_quantizer": {"type": "dynamic", "block_sizes": {"-1": null}}});
        let int8_tok = json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "token", "dynamic": true});
        assert_eq!(ct(&cfg_with("INT8_DEFAULT_CFG", per_token.clone())), (Some(int8_ch.clone()), Some(int8_tok)));
        assert_eq!(ct(&cfg_with("FP8_DEFAULT_CFG", per_token)).1, Some(fp8_tok));
        let w64 = cfg_with("INT8_WEIGHT_ONLY_CFG", json!({"*weight_quantizer": {"block_sizes": {"-1": 64}}}));
        assert_eq!(
            ct(&w64).0,
            Some(json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "group", "group_size": 64,
                        "dynamic": false}))
        );
        let w_tensor = cfg_with("INT8_DEFAULT_CFG", json!({"*weight_quantizer": {"axis": null}}));
        assert_eq!(ct(&w_tensor).0.unwrap()["strategy"], "tensor");
        let fp8_w_ch = cfg_with("FP8_WEIGHT_ONLY_CFG", json!({"*weight_quantizer": {"axis": 0}}));
        assert_eq!(ct(&fp8_w_ch).0, Some(fp8_ch));
        let a_dyn = cfg_with("INT8_DEFAULT_CFG", json!({"*input_quantizer": {"type": "dynamic"}}));
        assert_eq!(
            ct(&a_dyn).1,
            Some(json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "tensor", "dynamic": true}))
        );
    }

    #[test]
    fn inexpressible_formats_say_why() {
        let cases = [
            (cfg("W4A8_NVFP4_FP8_CFG"), "weights: FP4 (E2M1) in blocks of 32"),
            (cfg_with("INT8_DEFAULT_CFG", json!({"*weight_quantizer": {"axis": 1}})), "weights: per-input-channel"),
            (
                cfg_with("INT8_DEFAULT_CFG", json!({"*input_quantizer": {"axis": -1}})),
                "input activations: per-input-channel",
            ),
            (
                cfg_with("INT8_DEFAULT_CFG", json!({"*input_quantizer": {"block_sizes": {"-1": 64}}})),
                "input activations: static per-block",
            ),
            (cfg_with("INT8_WEIGHT_ONLY_CFG", json!({"*weight_quantizer": {"unsigned": true}})), "unsigned"),
            (
                cfg_with("NVFP4_WEIGHT_ONLY_CFG", json!({"*weight_quantizer": {"block_sizes": {"-1": 64}}})),
                "blocks of 64",
            ),
            (
                cfg_with("MXFP4_DEFAULT_CFG", json!({"*weight_quantizer": {"block_sizes": {"-1": 16}}})),
                "MXFP4 (E8M0 block scales) in blocks of 16",
            ),
        ];
        for (c, needle) in cases {
            let err = ct_scheme(&c).unwrap_err();
            assert!(err.contains(needle), "{}: {err}", c.format_name);
        }
        // Both quantizers wrong: both reasons.
        let both =
            cfg_with("INT8_DEFAULT_CFG", json!({"*weight_quantizer": {"axis": 1}, "*input_quantizer": {"axis": -1}}));
        let err = ct_scheme(&both).unwrap_err();
        assert!(err.starts_with("weights: ") && err.contains("; input activations: "), "{err}");
    }

    #[test]
    fn llm_compressor_recipe_groups_formats_ignores_and_lists_unsupported() {
        let (int8, fp8, nvfp4, int4, w4a8) = (
            cfg("INT8_DEFAULT_CFG"),
            cfg("FP8_DEFAULT_CFG"),
            cfg("NVFP4_DEFAULT_CFG"),
            cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"),
            cfg("W4A8_NVFP4_FP8_CFG"),
        );
        let qkv = |l: usize| -> Vec<String> {
            ["q", "k", "v"].iter().map(|p| format!("layers.{l}.self_attn.{p}_proj")).collect()
        };
        let (q0, q1, q11) = (qkv(0), qkv(1), qkv(11));
        let (o0, gu1, d1, d11) = (
            mods(&["layers.0.self_attn.o_proj"]),
            mods(&["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]),
            mods(&["layers.1.mlp.down_proj"]),
            mods(&["layers.11.mlp.down_proj"]),
        );
        let layers = [
            LayerChoice { group: "layers.0.self_attn.q_proj", modules: &q0, format: Some(("wint8_aint8", &int8)) },
            LayerChoice { group: "layers.0.self_attn.o_proj", modules: &o0, format: Some(("wfp8_afp8", &fp8)) },
            LayerChoice { group: "layers.1.self_attn.q_proj", modules: &q1, format: None },
            LayerChoice { group: "layers.1.mlp.gate_proj", modules: &gu1, format: Some(("wfp4_afp8", &w4a8)) },
            LayerChoice { group: "layers.1.mlp.down_proj", modules: &d1, format: Some(("wint4_afp16", &int4)) },
            LayerChoice { group: "layers.11.self_attn.q_proj", modules: &q11, format: Some(("wint8_aint8", &int8)) },
            LayerChoice { group: "layers.11.mlp.down_proj", modules: &d11, format: Some(("nvfp4", &nvfp4)) },
        ];
        let r = llm_compressor_recipe(&layers);
        assert_eq!(
            r.unsupported,
            vec![Unsupported {
                group: "layers.1.mlp.gate_proj".into(),
                modules: gu1.clone(),
                pair: "wfp4_afp8".into(),
                format: "W4A8_NVFP4_FP8_CFG".into(),
                why: ct_scheme(&w4a8).unwrap_err(),
            }]
        );
        let y: serde_yaml::Value = serde_yaml::from_str(&r.yaml).unwrap();
        let y: Value = serde_json::to_value(y).unwrap();
        let m = &y["quant_stage"]["quant_modifiers"]["QuantizationModifier"];
        assert_eq!(m.as_object().unwrap().keys().collect::<Vec<_>>(), ["ignore", "config_groups"]);
        let t = |list: &[String]| list.iter().map(|m| json!(llm_compressor_target(m))).collect::<Vec<_>>();
        let mut ignore = vec![json!("lm_head")];
        ignore.extend(t(&q1));
        ignore.extend(t(&gu1));
        assert_eq!(m["ignore"], Value::Array(ignore));
        let groups = m["config_groups"].as_object().unwrap();
        assert_eq!(groups.keys().collect::<Vec<_>>(), ["group_0", "group_1", "group_2", "group_3"]);
        // INT8 W8A8: layers 0 and 11 share one group, in input order.
        let mut g0_targets = t(&q0);
        g0_targets.extend(t(&q11));
        let (w, i) = ct(&int8);
        assert_eq!(groups["group_0"], json!({"targets": g0_targets, "weights": w, "input_activations": i}));
        let (w, i) = ct(&fp8);
        assert_eq!(groups["group_1"], json!({"targets": t(&o0), "weights": w, "input_activations": i}));
        let (w, _) = ct(&int4);
        assert_eq!(groups["group_2"], json!({"targets": t(&d1), "weights": w, "input_activations": null}));
        let (w, i) = ct(&nvfp4);
        assert_eq!(groups["group_3"], json!({"targets": t(&d11), "weights": w, "input_activations": i}));
        // Each group's pairs and formats are in a comment.
        assert!(r.yaml.contains("          # wint8_aint8: INT8_DEFAULT_CFG\n"), "{}", r.yaml);
        // Deterministic.
        assert_eq!(llm_compressor_recipe(&layers), r);
    }

    #[test]
    fn llm_compressor_recipe_with_nothing_to_quantize_targets_nothing() {
        let (d0, d1) = (mods(&["layers.0.mlp.down_proj"]), mods(&["layers.1.mlp.down_proj"]));
        let w4a8 = cfg("W4A8_NVFP4_FP8_CFG");
        let r = llm_compressor_recipe(&[
            LayerChoice { group: "layers.0.mlp.down_proj", modules: &d0, format: None },
            LayerChoice { group: "layers.1.mlp.down_proj", modules: &d1, format: Some(("wfp4_afp8", &w4a8)) },
        ]);
        assert_eq!(r.unsupported.len(), 1);
        let y: Value = serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&r.yaml).unwrap()).unwrap();
        let m = &y["quant_stage"]["quant_modifiers"]["QuantizationModifier"];
        assert_eq!(m["targets"], json!([]));
        assert_eq!(m["config_groups"], json!({}));
        assert_eq!(m["ignore"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn recipe_expectations_describe_both_exports() {
        let (int8, w4a8) = (cfg("INT8_WEIGHT_ONLY_CFG"), cfg("W4A8_NVFP4_FP8_CFG"));
        let (a, b, c) =
            (mods(&["layers.0.mlp.down_proj"]), mods(&["layers.1.mlp.down_proj"]), mods(&["layers.2.mlp.down_proj"]));
        let e = recipe_expectations(&[
            LayerChoice { group: "layers.0.mlp.down_proj", modules: &a, format: Some(("wint8_afp16", &int8)) },
            LayerChoice { group: "layers.1.mlp.down_proj", modules: &b, format: Some(("wfp4_afp8", &w4a8)) },
            LayerChoice { group: "layers.2.mlp.down_proj", modules: &c, format: None },
        ]);
        assert_eq!(e["lm_prefix"], LM_PREFIX);
        let g = e["groups"].as_array().unwrap();
        assert_eq!(
            g[0],
            json!({"group": "layers.0.mlp.down_proj", "modules": ["layers.0.mlp.down_proj"], "pair": "wint8_afp16",
                   "format": "INT8_WEIGHT_ONLY_CFG",
                   "modelopt": {"weight": {"enable": true, "num_bits": 8, "axis": 0}, "input": {"enable": false}},
                   "llm_compressor": {"weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel",
                                                  "dynamic": false},
                                      "input_activations": null}})
        );
        assert_eq!(g[1]["modelopt"]["input"], json!({"enable": true, "num_bits": [4, 3], "axis": null}));
        assert!(g[1]["llm_compressor"]["unsupported"].as_str().unwrap().starts_with("weights: FP4"));
        assert_eq!(g[2]["pair"], Value::Null);
        assert_eq!(g[2]["modelopt"], json!({"weight": {"enable": false}, "input": {"enable": false}}));
        assert_eq!(g[2]["llm_compressor"], json!({"weights": null, "input_activations": null}));
    }

    /// Writes sample exports for `scripts/check_recipe_exports.py` on the tiny checkpoint
    /// (4 decoder layers) into `$QPIPE_EXPORT_SAMPLE_DIR`:
    /// `QPIPE_EXPORT_SAMPLE_DIR=/tmp/x cargo test -p qpipe-stages --lib write_sample_exports -- --ignored`.
    #[test]
    #[ignore = "writes files; run by hand to feed scripts/check_recipe_exports.py"]
    fn write_sample_exports() {
        let dir = std::path::PathBuf::from(std::env::var("QPIPE_EXPORT_SAMPLE_DIR").expect("QPIPE_EXPORT_SAMPLE_DIR"));
        std::fs::create_dir_all(&dir).unwrap();
        let per_layer: [[Option<(&str, &str)>; 4]; 4] = [
            [
                Some(("wint8_aint8", "INT8_DEFAULT_CFG")),
                Some(("wfp8_afp8", "FP8_DEFAULT_CFG")),
                Some(("wfp4_afp4", "NVFP4_DEFAULT_CFG")),
                Some(("wint4_afp16", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG")),
            ],
            [
                Some(("wfp4_afp8", "W4A8_NVFP4_FP8_CFG")),
                Some(("wfp8_afp8_tok", "FP8_PER_CHANNEL_PER_TOKEN_CFG")),
                Some(("mxfp4", "MXFP4_DEFAULT_CFG")),
                None,
            ],
            [
                Some(("wint8_afp8", "INT8_WEIGHT_FP8_ACT_CFG")),
                Some(("wfp8_afp16", "FP8_WEIGHT_ONLY_CFG")),
                Some(("wfp4_aint8", "NVFP4_WEIGHT_INT8_ACT_CFG")),
                Some(("wint8_aint4", "INT8_WEIGHT_INT4_ACT_CFG")),
            ],
            [
                Some(("mxfp8", "MXFP8_DEFAULT_CFG")),
                Some(("wfp4_afp16", "NVFP4_WEIGHT_ONLY_CFG")),
                Some(("wint4_afp8", "INT4_WEIGHT_FP8_ACT_CFG")),
                None,
            ],
        ];
        let heads: [(&str, &[&str]); 4] = [
            ("self_attn.q_proj", &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            ("self_attn.o_proj", &["self_attn.o_proj"]),
            ("mlp.gate_proj", &["mlp.gate_proj", "mlp.up_proj"]),
            ("mlp.down_proj", &["mlp.down_proj"]),
        ];
        let mut groups = Vec::new();
        for (l, row) in per_layer.iter().enumerate() {
            for (&(head, members), choice) in heads.iter().zip(row) {
                let modules: Vec<String> = members.iter().map(|m| format!("layers.{l}.{m}")).collect();
                groups.push((format!("layers.{l}.{head}"), modules, choice.map(|(p, f)| (p, cfg(f)))));
            }
        }
        let layers: Vec<LayerChoice<'_>> = groups
            .iter()
            .map(|(g, m, f)| LayerChoice { group: g, modules: m, format: f.as_ref().map(|(p, c)| (*p, c)) })
            .collect();
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap() + "\n";
        std::fs::write(dir.join("modelopt_config.json"), pretty(&modelopt_config(&layers))).unwrap();
        std::fs::write(dir.join("llm_compressor_recipe.yaml"), llm_compressor_recipe(&layers).yaml).unwrap();
        std::fs::write(dir.join("export_expectations.json"), pretty(&recipe_expectations(&layers))).unwrap();
    }
}
