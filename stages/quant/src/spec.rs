//! Quantizer specs (ModelOpt's `QuantizerAttributeConfig`), the formats qpipe knows, the
//! granularity overlays, validation, effective bits and display names.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

use crate::observer::AmaxKind;
use crate::types::{NumBits, Quantizer, Role, Scheme};

/// `block_sizes` of a quantizer: blocks along the last dimension only (what every ModelOpt
/// LLM format uses).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSizes {
    /// `{-1: n}`; `None` = `{-1: None}`: one block spanning the whole last dimension (per
    /// token for activations, per output channel for weights).
    pub last_dim: Option<usize>,
    /// `type: dynamic` inside `block_sizes`: block scales computed from the tensor at hand.
    pub dynamic: bool,
    /// `scale_bits`: format of the block scales ((4,3) NVFP4, (8,0) MX); `None` = full precision.
    pub scale_bits: Option<NumBits>,
}

/// One quantizer (weight or input) of a Linear, mirroring ModelOpt's
/// `QuantizerAttributeConfig` fields that affect the numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizerSpec {
    pub enable: bool,
    pub num_bits: NumBits,
    /// `None` = per tensor; `Some(0)` = per output channel (weights); `Some(1)`/`Some(-1)` =
    /// per input channel. Mutually exclusive with `block_sizes`.
    pub axis: Option<i64>,
    pub block_sizes: Option<BlockSizes>,
    /// Attribute `type: dynamic`: ranges from the tensor at hand instead of calibration.
    pub dynamic: bool,
    pub unsigned: bool,
    /// ModelOpt's default is `false`: INT8 clamps to [-128, 127] (scale = amax / 127).
    pub narrow_range: bool,
    /// `effective_bits` override for the cost model (NVFP4 = 4.5).
    pub effective_bits: Option<f64>,
}

impl QuantizerSpec {
    /// A disabled quantizer (`{"enable": False}`).
    pub fn off() -> Self {
        Self { enable: false, ..Self::int(8, None) }
    }

    /// `{"num_bits": b, "axis": axis}`.
    pub fn int(bits: u8, axis: Option<i64>) -> Self {
        Self {
            enable: true,
            num_bits: NumBits::Int(bits),
            axis,
            block_sizes: None,
            dynamic: false,
            unsigned: false,
            narrow_range: false,
            effective_bits: None,
        }
    }

    /// `{"num_bits": (4, 3), "axis": axis}`.
    pub fn fp8(axis: Option<i64>) -> Self {
        Self { num_bits: NumBits::FP8_E4M3, ..Self::int(8, axis) }
    }

    /// `{"num_bits": b, "block_sizes": {-1: size, "type": "static"}}`.
    pub fn int_blocks(bits: u8, size: usize) -> Self {
        Self {
            block_sizes: Some(BlockSizes { last_dim: Some(size), dynamic: false, scale_bits: None }),
            ..Self::int(bits, None)
        }
    }

    /// `{"num_bits": elem, "block_sizes": {-1: size, "type": "dynamic", "scale_bits": scale}}`.
    pub fn dynamic_blocks(elem: NumBits, size: usize, scale: NumBits, effective_bits: Option<f64>) -> Self {
        Self {
            num_bits: elem,
            block_sizes: Some(BlockSizes { last_dim: Some(size), dynamic: true, scale_bits: Some(scale) }),
            effective_bits,
            ..Self::int(8, None)
        }
    }

    /// NVFP4 as ModelOpt's `configs/numerics/nvfp4` defines it: E2M1 in dynamic blocks of
    /// 16 with E4M3 block scales, `effective_bits: 4.5`.
    pub fn nvfp4() -> Self {
        Self::dynamic_blocks(NumBits::FP4_E2M1, 16, NumBits::FP8_E4M3, Some(4.5))
    }

    /// MXFP4: E2M1 in dynamic blocks of 32 with E8M0 (power-of-two) scales.
    pub fn mxfp4() -> Self {
        Self::dynamic_blocks(NumBits::FP4_E2M1, 32, NumBits::E8M0, None)
    }

    /// A quantizer from a ModelOpt attribute dict (`{"num_bits": 8, "axis": 0}`), starting
    /// from `QuantizerAttributeConfig`'s defaults (8-bit integer, per tensor, static,
    /// enabled). Same keys and rules as the granularity overlays.
    pub fn from_attributes(attrs: &Map<String, Value>) -> Result<Self> {
        let mut spec = Self::int(8, None);
        apply_overlay(&mut spec, attrs)
            .map_err(|e| anyhow!("quantizer attributes {}: {e}", Value::Object(attrs.clone())))?;
        Ok(spec)
    }

    /// Bits per element for the cost model, as ModelOpt's `estimate_quant_compression`
    /// computes them: 16 when disabled, else `effective_bits`, else [`NumBits::storage_bits`].
    pub fn effective_bits(&self) -> f64 {
        if !self.enable {
            16.0
        } else {
            self.effective_bits.unwrap_or_else(|| self.num_bits.storage_bits())
        }
    }

    /// What the fake quantizer does for a tensor in `role`, or why this spec cannot be run.
    pub fn scheme(&self, role: Role) -> std::result::Result<Scheme, String> {
        if !self.enable {
            return Ok(Scheme::Off);
        }
        if let NumBits::Int(b) = self.num_bits {
            if !(2..=16).contains(&b) {
                return Err(format!("num_bits {b} is outside the supported integer widths 2..=16"));
            }
        }
        let elem = self.num_bits;
        let fp8 = elem == NumBits::FP8_E4M3;
        let fp4 = elem == NumBits::FP4_E2M1;
        if !matches!(elem, NumBits::Int(_)) && !fp8 && !fp4 {
            return Err(format!(
                "num_bits {} is not an element format qpipe implements (integers, (4, 3) FP8 E4M3, (2, 1) FP4 E2M1)",
                elem.label()
            ));
        }
        if self.unsigned && !matches!(elem, NumBits::Int(_)) {
            return Err("`unsigned` applies to integer formats only".into());
        }
        if let Some(bs) = &self.block_sizes {
            if self.axis.is_some() {
                return Err("`axis` and `block_sizes` are mutually exclusive (ModelOpt: axis must be None when \
                            block_sizes is set)"
                    .into());
            }
            let Some(size) = bs.last_dim else {
                // {-1: None}: one range per row.
                if role == Role::Input && !self.dynamic && !bs.dynamic {
                    return Err("per-token ranges (`block_sizes: {-1: null}`) of activations must be dynamic: \
                                static ranges cannot follow a varying number of tokens"
                        .into());
                }
                if fp4 {
                    return Err(e2m1_needs_blocks());
                }
                return Ok(Scheme::Scaled { elem, kind: AmaxKind::PerRow, dynamic: self.dynamic || bs.dynamic });
            };
            if size == 0 {
                return Err("block size 0".into());
            }
            if bs.dynamic {
                return match (elem, bs.scale_bits) {
                    (NumBits::FP4_E2M1, Some(NumBits::FP8_E4M3)) => {
                        Ok(Scheme::Nvfp4 { block: size, global_dynamic: self.dynamic })
                    }
                    (NumBits::FP4_E2M1 | NumBits::FP8_E4M3, Some(NumBits::E8M0)) => {
                        Ok(Scheme::Mx { elem, block: size })
                    }
                    (e, s) => Err(format!(
                        "dynamic blocks of {} with scale_bits {} are not a format qpipe implements (NVFP4: (2, 1) \
                         with (4, 3); MX: (2, 1) or (4, 3) with (8, 0))",
                        e.label(),
                        s.map_or("None".into(), NumBits::label)
                    )),
                };
            }
            if fp4 {
                return Err("static E2M1 blocks (ModelOpt's static NVFP4 weight path) are not implemented; use \
                            dynamic blocks"
                    .into());
            }
            if bs.scale_bits.is_some() {
                return Err("`scale_bits` needs `type: dynamic` blocks".into());
            }
            return Ok(Scheme::Scaled { elem, kind: AmaxKind::PerBlock(size), dynamic: self.dynamic });
        }
        if fp4 {
            return Err(e2m1_needs_blocks());
        }
        let kind = match (role, self.axis) {
            (_, None) => AmaxKind::PerTensor,
            (Role::Weight, Some(0)) => AmaxKind::PerRow,
            (Role::Weight, Some(1 | -1)) | (Role::Input, Some(-1)) => AmaxKind::PerCol,
            (Role::Weight, Some(a)) => return Err(format!("axis {a} is out of range for a 2-D weight [out, in]")),
            (Role::Input, Some(a)) => {
                return Err(format!(
                    "axis {a} on activations depends on the batch layout; use axis -1 (per input channel), null \
                     (per tensor) or per-token `block_sizes: {{-1: null}}` with `type: dynamic`"
                ))
            }
        };
        if role == Role::Input && kind == AmaxKind::PerRow && !self.dynamic {
            return Err("static per-row activation ranges are not possible".into());
        }
        Ok(Scheme::Scaled { elem, kind, dynamic: self.dynamic })
    }
}

fn e2m1_needs_blocks() -> String {
    "FP4 E2M1 needs block scales: ModelOpt has no per-tensor or per-channel E2M1 fake quantization (its \
     scaled_e4m3 implements E4M3 only); change the FP4 block size with w_group64 / w_group128 instead"
        .into()
}

/// A format's two quantizers, as built-in or composed; see [`BUILTIN_FORMATS`] and
/// [`COMPOSED_FORMATS`].
struct FormatDef {
    name: &'static str,
    weight: fn() -> QuantizerSpec,
    input: fn() -> QuantizerSpec,
}

macro_rules! fmt_def {
    ($name:literal, $w:expr, $i:expr) => {
        FormatDef { name: $name, weight: || $w, input: || $i }
    };
}

/// ModelOpt 0.47's built-in formats (`modelopt.torch.quantization.config`, the
/// `*weight_quantizer` / `*input_quantizer` entries of each preset). A config equal to one
/// of these prints under its name; anything else prints as `CUSTOM_<i>`.
const BUILTIN_FORMATS: &[FormatDef] = &[
    fmt_def!("INT8_DEFAULT_CFG", QuantizerSpec::int(8, Some(0)), QuantizerSpec::int(8, None)),
    fmt_def!("INT8_WEIGHT_ONLY_CFG", QuantizerSpec::int(8, Some(0)), QuantizerSpec::off()),
    fmt_def!("FP8_DEFAULT_CFG", QuantizerSpec::fp8(None), QuantizerSpec::fp8(None)),
    fmt_def!(
        "FP8_PER_CHANNEL_PER_TOKEN_CFG",
        QuantizerSpec::fp8(Some(0)),
        QuantizerSpec {
            dynamic: true,
            block_sizes: Some(BlockSizes { last_dim: None, dynamic: false, scale_bits: None }),
            ..QuantizerSpec::fp8(None)
        }
    ),
    fmt_def!("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", QuantizerSpec::int_blocks(4, 128), QuantizerSpec::off()),
    fmt_def!("NVFP4_DEFAULT_CFG", QuantizerSpec::nvfp4(), QuantizerSpec::nvfp4()),
    fmt_def!("W4A16_NVFP4_CFG", QuantizerSpec::nvfp4(), QuantizerSpec::off()),
    fmt_def!(
        "W4A8_NVFP4_FP8_CFG",
        QuantizerSpec::dynamic_blocks(NumBits::FP4_E2M1, 32, NumBits::FP8_E4M3, None),
        QuantizerSpec::fp8(None)
    ),
    fmt_def!("MXFP4_DEFAULT_CFG", QuantizerSpec::mxfp4(), QuantizerSpec::mxfp4()),
    fmt_def!("W4A8_MXFP4_FP8_CFG", QuantizerSpec::mxfp4(), QuantizerSpec::fp8(None)),
    fmt_def!(
        "MXFP8_DEFAULT_CFG",
        QuantizerSpec::dynamic_blocks(NumBits::FP8_E4M3, 32, NumBits::E8M0, None),
        QuantizerSpec::dynamic_blocks(NumBits::FP8_E4M3, 32, NumBits::E8M0, None)
    ),
];

/// The seed's custom formats (its `CUSTOM_QUANT_CONFIGS`), composed from the built-in
/// pieces each name describes: INT8 weights per output channel, FP8 weights per tensor,
/// INT4 weights in static blocks of 128, NVFP4 weights as `configs/numerics/nvfp4`
/// (effective bits 4.5); INT8 / INT4 / FP8 activations per tensor, static (max
/// calibration); `*_WEIGHT_ONLY` = input quantizer off. ModelOpt prints these as
/// `CUSTOM_<i>`.
const COMPOSED_FORMATS: &[FormatDef] = &[
    fmt_def!("INT8_WEIGHT_FP8_ACT_CFG", QuantizerSpec::int(8, Some(0)), QuantizerSpec::fp8(None)),
    fmt_def!("INT8_WEIGHT_INT4_ACT_CFG", QuantizerSpec::int(8, Some(0)), QuantizerSpec::int(4, None)),
    fmt_def!("FP8_WEIGHT_ONLY_CFG", QuantizerSpec::fp8(None), QuantizerSpec::off()),
    fmt_def!("FP8_WEIGHT_INT8_ACT_CFG", QuantizerSpec::fp8(None), QuantizerSpec::int(8, None)),
    fmt_def!("FP8_WEIGHT_INT4_ACT_CFG", QuantizerSpec::fp8(None), QuantizerSpec::int(4, None)),
    fmt_def!("INT4_WEIGHT_FP8_ACT_CFG", QuantizerSpec::int_blocks(4, 128), QuantizerSpec::fp8(None)),
    fmt_def!("INT4_WEIGHT_INT8_ACT_CFG", QuantizerSpec::int_blocks(4, 128), QuantizerSpec::int(8, None)),
    fmt_def!("INT4_WEIGHT_INT4_ACT_CFG", QuantizerSpec::int_blocks(4, 128), QuantizerSpec::int(4, None)),
    fmt_def!("NVFP4_WEIGHT_ONLY_CFG", QuantizerSpec::nvfp4(), QuantizerSpec::off()),
    fmt_def!("NVFP4_WEIGHT_INT8_ACT_CFG", QuantizerSpec::nvfp4(), QuantizerSpec::int(8, None)),
    fmt_def!("NVFP4_WEIGHT_INT4_ACT_CFG", QuantizerSpec::nvfp4(), QuantizerSpec::int(4, None)),
];

/// Every format name [`config_for`] accepts: ModelOpt built-ins first, then the composed ones.
pub fn known_formats() -> Vec<&'static str> {
    BUILTIN_FORMATS.iter().chain(COMPOSED_FORMATS).map(|f| f.name).collect()
}

/// `NONE(effective-bits: 16.0)`: the "not quantized" candidate.
pub const NONE_DISPLAY_NAME: &str = "NONE(effective-bits: 16.0)";

/// A resolved, validated format: what `score` quantizes with.
#[derive(Clone, Debug)]
pub struct QuantConfig {
    /// The name asked for (`format_name` of the pair).
    pub format_name: String,
    /// Whether `format_name` is a ModelOpt built-in.
    pub builtin: bool,
    pub weight: QuantizerSpec,
    pub input: QuantizerSpec,
    /// Resolved kernels of `weight` / `input` (validated when built).
    pub weight_scheme: Scheme,
    pub input_scheme: Scheme,
    /// Overlays that changed nothing or that ModelOpt itself could not run as asked.
    pub warnings: Vec<String>,
    base_weight: QuantizerSpec,
    base_input: QuantizerSpec,
}

/// Builds `format_name` with the granularity overlay `quant_cfg_overrides` applied (keys
/// `*weight_quantizer` / `*input_quantizer`, values partial quantizer attributes as in
/// pipeline.yaml's `quant_granularity`), and validates the result.
///
/// Overlay semantics (a granularity overlay sets the granularity it names):
/// - `axis: null|int` makes the quantizer per tensor / per channel and drops static
///   integer/FP8 blocks (ModelOpt rejects `axis` together with `block_sizes`). On FP4
///   (E2M1) quantizers it is an error: E2M1 only exists with block scales.
/// - `block_sizes: {-1: n|null, type?, scale_bits?}` sets the block size along the input
///   dimension and drops `axis` (as ModelOpt's `block_sizes` setter does); `type` /
///   `scale_bits` not given keep the base's block kind (NVFP4 stays dynamic with E4M3 scales).
/// - `type: static|dynamic` sets where ranges come from.
/// - `num_bits`, `enable`, `unsigned`, `narrow_range`, `effective_bits` set those attributes.
/// - An overlay of a disabled quantizer (fp16 activations) changes nothing and is
///   reported in [`QuantConfig::warnings`].
///
/// Errors name the format, the overlay key and the reason.
pub fn config_for(format_name: &str, quant_cfg_overrides: &Map<String, Value>) -> Result<QuantConfig> {
    let (def, builtin) = BUILTIN_FORMATS
        .iter()
        .map(|d| (d, true))
        .chain(COMPOSED_FORMATS.iter().map(|d| (d, false)))
        .find(|(d, _)| d.name == format_name)
        .ok_or_else(|| {
            anyhow!("unknown quantization format `{format_name}`; known formats: {}", known_formats().join(", "))
        })?;
    let base_weight = (def.weight)();
    let base_input = (def.input)();
    let (mut weight, mut input) = (base_weight.clone(), base_input.clone());
    let mut warnings = Vec::new();
    for (key, overlay) in quant_cfg_overrides {
        let role = match key.as_str() {
            "*weight_quantizer" => Role::Weight,
            "*input_quantizer" => Role::Input,
            other => bail!(
                "format {format_name}: overlay key `{other}`: qpipe quantizes Linear weights and inputs only; \
                 use `*weight_quantizer` or `*input_quantizer`"
            ),
        };
        let target = if role == Role::Weight { &mut weight } else { &mut input };
        let obj = overlay.as_object().ok_or_else(|| {
            anyhow!(
                "format {format_name}: overlay key `{key}`: expected a mapping of quantizer attributes, got {overlay}"
            )
        })?;
        let was_enabled = target.enable;
        apply_overlay(target, obj).map_err(|e| anyhow!("format {format_name}: overlay key `{key}`: {e}"))?;
        if !was_enabled && !obj.contains_key("enable") {
            // Keep the (updated) attributes but the quantizer stays off, as in ModelOpt.
            warnings.push(format!(
                "format {format_name}: overlay `{key}` has no effect: this format does not quantize {}",
                if role == Role::Weight { "weights" } else { "activations (fp16)" }
            ));
        }
    }
    let weight_scheme =
        weight.scheme(Role::Weight).map_err(|e| invalid(format_name, quant_cfg_overrides, Role::Weight, &e))?;
    let input_scheme =
        input.scheme(Role::Input).map_err(|e| invalid(format_name, quant_cfg_overrides, Role::Input, &e))?;
    for (spec, role) in [(&weight, Role::Weight), (&input, Role::Input)] {
        if let Some(BlockSizes { last_dim: Some(n), dynamic: true, .. }) = &spec.block_sizes {
            if spec.enable && ![8, 16, 32].contains(n) {
                warnings.push(format!(
                    "format {format_name}: `{}` uses dynamic blocks of {n}; ModelOpt's CUDA kernel only takes 8, 16 \
                     or 32 and its Hopper NVFP4 Triton kernel always uses 16 — qpipe follows the config",
                    role.pattern()
                ));
            }
        }
    }
    Ok(QuantConfig {
        format_name: format_name.to_string(),
        builtin,
        weight,
        input,
        weight_scheme,
        input_scheme,
        warnings,
        base_weight,
        base_input,
    })
}

/// Load-time validation of one grid cell (pipeline.yaml `quant_pair` × `quant_granularity`)
/// against a model's Linear shapes `(in_features, out_features)`: the built config, or an
/// error naming the pair, the granularity, the format, the overlay key and the reason.
pub fn check_combination(
    pair: &str,
    granularity: &str,
    format_name: &str,
    quant_cfg_overrides: &Map<String, Value>,
    linear_shapes: &[(usize, usize)],
) -> Result<QuantConfig> {
    let ctx = || format!("quant_pair `{pair}` × quant_granularity `{granularity}`");
    let cfg = config_for(format_name, quant_cfg_overrides).map_err(|e| anyhow!("{}: {e:#}", ctx()))?;
    for &(in_features, out_features) in linear_shapes {
        cfg.check_shape(in_features, out_features).map_err(|e| anyhow!("{}: {e:#}", ctx()))?;
    }
    Ok(cfg)
}

fn invalid(format: &str, overrides: &Map<String, Value>, role: Role, reason: &str) -> anyhow::Error {
    match overrides.get(role.pattern()) {
        Some(v) => anyhow!("format {format}: overlay key `{}` ({v}): {reason}", role.pattern()),
        None => anyhow!("format {format}: `{}`: {reason}", role.pattern()),
    }
}

fn parse_num_bits(v: &Value) -> std::result::Result<NumBits, String> {
    if let Some(b) = v.as_u64() {
        return u8::try_from(b).map(NumBits::Int).map_err(|_| format!("num_bits {b} is too large"));
    }
    if let Some([e, m]) = v.as_array().map(Vec::as_slice) {
        if let (Some(e), Some(m)) = (e.as_u64(), m.as_u64()) {
            if e <= 8 && m <= 23 {
                return Ok(NumBits::Float { e: e as u8, m: m as u8 });
            }
        }
    }
    Err(format!("expected an integer or an [E, M] pair, got {v}"))
}

fn parse_bool(key: &str, v: &Value) -> std::result::Result<bool, String> {
    v.as_bool().ok_or_else(|| format!("`{key}`: expected true or false, got {v}"))
}

fn parse_type(key: &str, v: &Value) -> std::result::Result<bool, String> {
    match v.as_str() {
        Some("dynamic") => Ok(true),
        Some("static") => Ok(false),
        _ => Err(format!("`{key}`: expected \"static\" or \"dynamic\", got {v}")),
    }
}

fn apply_overlay(spec: &mut QuantizerSpec, obj: &Map<String, Value>) -> std::result::Result<(), String> {
    const KEYS: &[&str] =
        &["enable", "num_bits", "axis", "block_sizes", "type", "unsigned", "narrow_range", "effective_bits"];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!("unknown quantizer attribute `{k}` (qpipe supports: {})", KEYS.join(", ")));
    }
    if obj.contains_key("block_sizes") && obj.get("axis").is_some_and(|a| !a.is_null()) {
        return Err("`axis` and `block_sizes` are mutually exclusive".into());
    }
    if let Some(v) = obj.get("enable") {
        spec.enable = parse_bool("enable", v)?;
    }
    if let Some(v) = obj.get("num_bits") {
        spec.num_bits = parse_num_bits(v).map_err(|e| format!("`num_bits`: {e}"))?;
    }
    if let Some(v) = obj.get("type") {
        spec.dynamic = parse_type("type", v)?;
    }
    if let Some(v) = obj.get("unsigned") {
        spec.unsigned = parse_bool("unsigned", v)?;
    }
    if let Some(v) = obj.get("narrow_range") {
        spec.narrow_range = parse_bool("narrow_range", v)?;
    }
    if let Some(v) = obj.get("effective_bits") {
        let b = v.as_f64().filter(|b| *b > 0.0 && *b <= 16.0);
        spec.effective_bits =
            Some(b.ok_or_else(|| format!("`effective_bits`: expected a number in (0, 16], got {v}"))?);
    }
    if let Some(v) = obj.get("axis") {
        let axis = match v {
            Value::Null => None,
            v => Some(v.as_i64().ok_or_else(|| format!("`axis`: expected null or an integer, got {v}"))?),
        };
        if spec.num_bits == NumBits::FP4_E2M1 && !obj.contains_key("num_bits") {
            return Err(format!("`axis: {v}` on an FP4 (E2M1) quantizer: {}", e2m1_needs_blocks()));
        }
        spec.block_sizes = None;
        spec.axis = axis;
    }
    if let Some(v) = obj.get("block_sizes") {
        let bs_obj = v.as_object().ok_or_else(|| format!("`block_sizes`: expected a mapping, got {v}"))?;
        let base = spec.block_sizes.clone();
        let mut bs = BlockSizes {
            last_dim: None,
            dynamic: base.as_ref().is_some_and(|b| b.dynamic),
            scale_bits: base.as_ref().and_then(|b| b.scale_bits),
        };
        let mut saw_last = false;
        for (k, val) in bs_obj {
            match k.as_str() {
                "-1" => {
                    saw_last = true;
                    bs.last_dim = match val {
                        Value::Null => None,
                        v => Some(
                            v.as_u64()
                                .filter(|n| *n > 0)
                                .ok_or_else(|| format!("`block_sizes.-1`: expected null or a positive size, got {v}"))?
                                as usize,
                        ),
                    };
                }
                "type" => bs.dynamic = parse_type("block_sizes.type", val)?,
                "scale_bits" => bs.scale_bits = Some(parse_num_bits(val).map_err(|e| format!("`scale_bits`: {e}"))?),
                other => {
                    return Err(format!(
                        "`block_sizes.{other}`: qpipe supports blocks along the last (input) dimension only: key -1, \
                         plus `type` and `scale_bits`"
                    ))
                }
            }
        }
        if !saw_last {
            return Err("`block_sizes` needs the key -1 (the block size along the input dimension)".into());
        }
        if bs.last_dim.is_none() {
            // {-1: None} is a per-row range, not a block format: block scales do not apply.
            bs.scale_bits = None;
        }
        spec.axis = None;
        spec.block_sizes = Some(bs);
    }
    Ok(())
}

/// Formats effective bits as Python's `str(float)` does for these values (`8.0`, `4.5`).
pub fn format_bits(bits: f64) -> String {
    format!("{bits:?}")
}

impl QuantConfig {
    /// Effective bits as ModelOpt's `estimate_quant_compression` computes them: the minimum
    /// over the enabled quantizers (weight and input) of each one's bits; 16 if none is on.
    /// (ModelOpt 0.47: `W4A8_NVFP4_FP8_CFG` → 4.0, `NVFP4_DEFAULT_CFG` → 4.5, FP8 weights
    /// with INT4 activations → 4.0.)
    pub fn effective_bits(&self) -> f64 {
        [&self.weight, &self.input].iter().filter(|q| q.enable).map(|q| q.effective_bits()).fold(16.0, f64::min)
    }

    /// Whether this config prints under its own (built-in) name: built-in and not changed by
    /// the overlays. (ModelOpt compares config dicts; qpipe compares the resolved quantizers.)
    pub fn prints_as_builtin(&self) -> bool {
        self.builtin && self.weight == self.base_weight && self.input == self.base_input
    }

    /// The candidate name ModelOpt's `auto_quantize` prints in `candidate_stats`:
    /// `INT8_DEFAULT_CFG(effective-bits: 8.0)`, or `CUSTOM_<i>(effective-bits: X)` for a
    /// non-built-in config at index `i` of `quantization_formats` (qpipe passes one format,
    /// so `i` = 0; see [`QuantConfig::display_name`]).
    pub fn display_name_at(&self, format_index: usize) -> String {
        let bits = format_bits(self.effective_bits());
        if self.prints_as_builtin() {
            format!("{}(effective-bits: {bits})", self.format_name)
        } else {
            format!("CUSTOM_{format_index}(effective-bits: {bits})")
        }
    }

    /// [`QuantConfig::display_name_at`] index 0: the name for a one-format search.
    pub fn display_name(&self) -> String {
        self.display_name_at(0)
    }

    /// Cost of quantizing a weight of `weight_elements` with this format, as ModelOpt's
    /// auto_quantize counts it: elements × effective bits / 16.
    pub fn cost(&self, weight_elements: usize) -> f64 {
        weight_elements as f64 * self.effective_bits() / 16.0
    }

    /// Checks that a Linear `[out_features, in_features]` can be quantized with this
    /// format: every block size divides `in_features` (weights are blocked along the input
    /// dimension; inputs along their last, hidden, dimension, which is `in_features` too).
    pub fn check_shape(&self, in_features: usize, out_features: usize) -> Result<()> {
        if in_features == 0 || out_features == 0 {
            bail!("format {}: a Linear [{out_features}, {in_features}] has no elements", self.format_name);
        }
        for (scheme, role) in [(&self.weight_scheme, Role::Weight), (&self.input_scheme, Role::Input)] {
            if let Some(block) = scheme.block_size() {
                if !in_features.is_multiple_of(block) {
                    bail!(
                        "format {}: `{}` uses blocks of {block} along the input dimension, which does not divide \
                         in_features = {in_features} (Linear [{out_features}, {in_features}]); choose a block size \
                         that divides it",
                        self.format_name,
                        role.pattern()
                    );
                }
            }
        }
        Ok(())
    }

    /// The fake quantizer of the weight.
    pub fn weight_quantizer(&self) -> Quantizer {
        Quantizer::new(self.weight_scheme.clone(), Role::Weight, self.weight.narrow_range, self.weight.unsigned)
    }

    /// The fake quantizer of the input activations.
    pub fn input_quantizer(&self) -> Quantizer {
        Quantizer::new(self.input_scheme.clone(), Role::Input, self.input.narrow_range, self.input.unsigned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn overlay(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn builtin_names_and_effective_bits_match_modelopt_047() {
        // What `str(QuantRecipe(name))` prints in ModelOpt 0.47 (checked by running it).
        let want = [
            ("INT8_DEFAULT_CFG", "INT8_DEFAULT_CFG(effective-bits: 8.0)"),
            ("INT8_WEIGHT_ONLY_CFG", "INT8_WEIGHT_ONLY_CFG(effective-bits: 8.0)"),
            ("FP8_DEFAULT_CFG", "FP8_DEFAULT_CFG(effective-bits: 8.0)"),
            ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG(effective-bits: 8.0)"),
            ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG(effective-bits: 4.0)"),
            ("NVFP4_DEFAULT_CFG", "NVFP4_DEFAULT_CFG(effective-bits: 4.5)"),
            ("W4A16_NVFP4_CFG", "W4A16_NVFP4_CFG(effective-bits: 4.5)"),
            ("MXFP4_DEFAULT_CFG", "MXFP4_DEFAULT_CFG(effective-bits: 4.0)"),
            ("W4A8_NVFP4_FP8_CFG", "W4A8_NVFP4_FP8_CFG(effective-bits: 4.0)"),
            ("W4A8_MXFP4_FP8_CFG", "W4A8_MXFP4_FP8_CFG(effective-bits: 4.0)"),
            ("MXFP8_DEFAULT_CFG", "MXFP8_DEFAULT_CFG(effective-bits: 8.0)"),
        ];
        for (name, shown) in want {
            let c = config_for(name, &Map::new()).unwrap();
            assert_eq!(c.display_name(), shown);
            assert!(c.warnings.is_empty(), "{name}: {:?}", c.warnings);
        }
        assert_eq!(NONE_DISPLAY_NAME, "NONE(effective-bits: 16.0)");
    }

    #[test]
    fn composed_formats_print_as_custom_with_min_bits() {
        let want = [
            ("FP8_WEIGHT_ONLY_CFG", 8.0),
            ("INT8_WEIGHT_FP8_ACT_CFG", 8.0),
            ("INT8_WEIGHT_INT4_ACT_CFG", 4.0),
            ("FP8_WEIGHT_INT4_ACT_CFG", 4.0),
            ("INT4_WEIGHT_INT8_ACT_CFG", 4.0),
            ("NVFP4_WEIGHT_ONLY_CFG", 4.5),
            ("NVFP4_WEIGHT_INT8_ACT_CFG", 4.5),
            ("NVFP4_WEIGHT_INT4_ACT_CFG", 4.0),
        ];
        for (name, bits) in want {
            let c = config_for(name, &Map::new()).unwrap();
            assert_eq!(c.effective_bits(), bits, "{name}");
            assert_eq!(c.display_name(), format!("CUSTOM_0(effective-bits: {})", format_bits(bits)));
            assert_eq!(c.display_name_at(3), format!("CUSTOM_3(effective-bits: {})", format_bits(bits)));
        }
        // The legacy FP8 weight-only artifacts print exactly this.
        assert_eq!(
            config_for("FP8_WEIGHT_ONLY_CFG", &Map::new()).unwrap().display_name(),
            "CUSTOM_0(effective-bits: 8.0)"
        );
    }

    #[test]
    fn cost_is_elements_times_bits_over_16() {
        let c = config_for("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", &Map::new()).unwrap();
        assert_eq!(c.cost(1000), 250.0);
        let c = config_for("NVFP4_DEFAULT_CFG", &Map::new()).unwrap();
        assert_eq!(c.cost(1024), 288.0);
    }

    #[test]
    fn overlays_change_granularity_and_name() {
        let c = config_for("INT8_DEFAULT_CFG", &overlay(json!({"*weight_quantizer": {"axis": 0}}))).unwrap();
        assert_eq!(c.display_name(), "INT8_DEFAULT_CFG(effective-bits: 8.0)", "same quantizers → same name");
        let c = config_for("INT8_DEFAULT_CFG", &overlay(json!({"*weight_quantizer": {"axis": null}}))).unwrap();
        assert_eq!(
            c.weight_scheme,
            Scheme::Scaled { elem: NumBits::Int(8), kind: AmaxKind::PerTensor, dynamic: false }
        );
        assert_eq!(c.display_name(), "CUSTOM_0(effective-bits: 8.0)");
        let c = config_for("INT8_DEFAULT_CFG", &overlay(json!({"*weight_quantizer": {"block_sizes": {"-1": 64}}})))
            .unwrap();
        assert_eq!(
            c.weight_scheme,
            Scheme::Scaled { elem: NumBits::Int(8), kind: AmaxKind::PerBlock(64), dynamic: false }
        );
        // INT4 blocks → per-channel INT4.
        let c =
            config_for("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", &overlay(json!({"*weight_quantizer": {"axis": 0}}))).unwrap();
        assert_eq!(c.weight_scheme, Scheme::Scaled { elem: NumBits::Int(4), kind: AmaxKind::PerRow, dynamic: false });
        // NVFP4 keeps its dynamic E4M3-scaled blocks with a new size, and says ModelOpt would not.
        let c =
            config_for("NVFP4_WEIGHT_ONLY_CFG", &overlay(json!({"*weight_quantizer": {"block_sizes": {"-1": 64}}})))
                .unwrap();
        assert_eq!(c.weight_scheme, Scheme::Nvfp4 { block: 64, global_dynamic: false });
        assert_eq!(c.effective_bits(), 4.5);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        // Per-token dynamic activations.
        let c = config_for(
            "FP8_DEFAULT_CFG",
            &overlay(json!({"*input_quantizer": {"type": "dynamic", "block_sizes": {"-1": null}}})),
        )
        .unwrap();
        assert_eq!(c.input_scheme, Scheme::Scaled { elem: NumBits::FP8_E4M3, kind: AmaxKind::PerRow, dynamic: true });
        // Overlays of a disabled input quantizer change nothing, with a warning.
        let c =
            config_for("INT8_WEIGHT_ONLY_CFG", &overlay(json!({"*input_quantizer": {"type": "static", "axis": null}})))
                .unwrap();
        assert_eq!(c.input_scheme, Scheme::Off);
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn nonsense_overlays_fail_naming_format_key_and_reason() {
        let cases = [
            ("NVFP4_WEIGHT_ONLY_CFG", json!({"*weight_quantizer": {"axis": 0}}), "E2M1"),
            ("INT8_DEFAULT_CFG", json!({"*output_quantizer": {"axis": 0}}), "*output_quantizer"),
            ("INT8_DEFAULT_CFG", json!({"*weight_quantizer": {"axis": 2}}), "out of range"),
            ("INT8_DEFAULT_CFG", json!({"*weight_quantizer": {"axsi": 0}}), "unknown quantizer attribute `axsi`"),
            ("INT8_DEFAULT_CFG", json!({"*input_quantizer": {"block_sizes": {"-1": null}}}), "must be dynamic"),
            ("INT8_DEFAULT_CFG", json!({"*weight_quantizer": {"block_sizes": {"0": 16}}}), "last (input) dimension"),
            ("INT8_DEFAULT_CFG", json!({"*weight_quantizer": {"axis": 0, "block_sizes": {"-1": 16}}}), "exclusive"),
            ("INT8_DEFAULT_CFG", json!({"*weight_quantizer": {"num_bits": [5, 2]}}), "element format"),
            ("INT8_DEFAULT_CFG", json!({"*weight_quantizer": 8}), "expected a mapping"),
            ("INT8_DEFAULT_CFG", json!({"*input_quantizer": {"type": "sometimes"}}), "\"static\" or \"dynamic\""),
        ];
        for (fmt, ov, needle) in cases {
            let err = config_for(fmt, &overlay(ov.clone())).unwrap_err().to_string();
            assert!(err.contains(fmt), "{err}");
            assert!(err.contains(needle), "{ov}: {err}");
            assert!(err.contains("quantizer"), "{err}");
        }
        let err = config_for("INT9_CFG", &Map::new()).unwrap_err().to_string();
        assert!(err.contains("INT9_CFG") && err.contains("INT8_DEFAULT_CFG"), "{err}");
    }

    #[test]
    fn check_shape_rejects_blocks_that_do_not_divide() {
        let c = config_for("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", &Map::new()).unwrap();
        c.check_shape(384, 128).unwrap();
        let err = c.check_shape(200, 128).unwrap_err().to_string();
        assert!(err.contains("128") && err.contains("in_features = 200"), "{err}");
        let c = config_for("NVFP4_DEFAULT_CFG", &Map::new()).unwrap();
        c.check_shape(48, 8).unwrap();
        assert!(c.check_shape(40, 8).is_err());
        config_for("INT8_DEFAULT_CFG", &Map::new()).unwrap().check_shape(7, 3).unwrap();
    }
}
