//! The quantizers' vocabulary, shared by the format tables ([`crate::spec`]), the CPU
//! implementation ([`crate::fake`]), the GPU launch plans ([`crate::kernels`]) and the
//! tensor-level entry points ([`crate::tensor`]): plain data, no arithmetic.

use anyhow::{bail, Result};

use crate::numerics::{E2M1_MAX, E4M3_MAX};
use crate::observer::{Amax, AmaxKind, AmaxObserver};

/// `num_bits` of a quantizer: an integer width or an `(E, M)` float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumBits {
    /// Signed (or unsigned) integer of this many bits.
    Int(u8),
    /// Float with `e` exponent and `m` mantissa bits: (4,3) = FP8 E4M3, (2,1) = FP4 E2M1,
    /// (8,0) = E8M0 (MX block scales only).
    Float { e: u8, m: u8 },
}

impl NumBits {
    pub const FP8_E4M3: NumBits = NumBits::Float { e: 4, m: 3 };
    pub const FP4_E2M1: NumBits = NumBits::Float { e: 2, m: 1 };
    pub const E8M0: NumBits = NumBits::Float { e: 8, m: 0 };

    /// Storage bits, as ModelOpt's cost heuristic counts them: `n` for ints, `E+M+1` for floats.
    pub fn storage_bits(self) -> f64 {
        match self {
            NumBits::Int(b) => f64::from(b),
            NumBits::Float { e, m } => f64::from(e) + f64::from(m) + 1.0,
        }
    }

    /// `8`, `(4, 3)` — how ModelOpt's configs write it.
    pub fn label(self) -> String {
        match self {
            NumBits::Int(b) => b.to_string(),
            NumBits::Float { e, m } => format!("({e}, {m})"),
        }
    }

    /// The largest magnitude of an element format that qpipe can round to.
    pub(crate) fn element_max(self) -> Option<f32> {
        match self {
            NumBits::FP8_E4M3 => Some(E4M3_MAX),
            NumBits::FP4_E2M1 => Some(E2M1_MAX),
            _ => None,
        }
    }
}

/// Which tensor a quantizer sees: a weight `[out, in]` or an input `[tokens, in]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Weight,
    Input,
}

impl Role {
    /// The quant_cfg pattern naming this quantizer.
    pub fn pattern(self) -> &'static str {
        match self {
            Role::Weight => "*weight_quantizer",
            Role::Input => "*input_quantizer",
        }
    }
}

/// What a quantizer computes, resolved and validated from its spec
/// ([`crate::QuantizerSpec::scheme`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Scheme {
    /// Not quantized: the tensor passes unchanged.
    Off,
    /// Integer or FP8 E4M3 with one scale per `kind` group, from calibrated ranges
    /// (`dynamic: false`) or from the tensor at hand.
    Scaled { elem: NumBits, kind: AmaxKind, dynamic: bool },
    /// NVFP4: E2M1 in dynamic blocks with E4M3 block scales under a per-tensor global
    /// scale; the global amax is calibrated (`global_dynamic: false`, ModelOpt's default
    /// for NVFP4 presets) or taken from the tensor at hand.
    Nvfp4 { block: usize, global_dynamic: bool },
    /// OCP MX: `elem` (E2M1 or E4M3) in dynamic blocks with a shared E8M0 scale.
    Mx { elem: NumBits, block: usize },
}

impl Scheme {
    /// The block size along the input dimension, if the scheme has blocks.
    pub fn block_size(&self) -> Option<usize> {
        match *self {
            Scheme::Scaled { kind: AmaxKind::PerBlock(n), .. }
            | Scheme::Nvfp4 { block: n, .. }
            | Scheme::Mx { block: n, .. } => Some(n),
            _ => None,
        }
    }

    /// The kind of calibrated ranges this scheme needs, `None` if it needs none.
    pub fn calibration_kind(&self) -> Option<AmaxKind> {
        match *self {
            Scheme::Scaled { kind, dynamic: false, .. } => Some(kind),
            Scheme::Nvfp4 { global_dynamic: false, .. } => Some(AmaxKind::PerTensor),
            _ => None,
        }
    }
}

/// A ready-to-use fake quantizer for one role (weight or input) of a format.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantizer {
    pub(crate) scheme: Scheme,
    pub(crate) role: Role,
    pub(crate) narrow_range: bool,
    pub(crate) unsigned: bool,
}

impl Quantizer {
    pub fn new(scheme: Scheme, role: Role, narrow_range: bool, unsigned: bool) -> Self {
        Self { scheme, role, narrow_range, unsigned }
    }

    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Unsigned integer grid (`unsigned: true`).
    pub fn is_unsigned(&self) -> bool {
        self.unsigned
    }

    /// Integer grid symmetric around zero (`narrow_range: true`).
    pub fn is_narrow_range(&self) -> bool {
        self.narrow_range
    }

    pub fn is_enabled(&self) -> bool {
        self.scheme != Scheme::Off
    }

    /// Whether [`Quantizer::fake_quant`] needs calibrated ranges (static "max" calibration).
    pub fn needs_calibration(&self) -> bool {
        self.scheme.calibration_kind().is_some()
    }

    /// A max-calibration accumulator with this quantizer's range layout (`None` when the
    /// quantizer needs no calibration: off or fully dynamic).
    pub fn observer(&self) -> Option<AmaxObserver> {
        self.scheme.calibration_kind().map(AmaxObserver::new)
    }
}

/// A tensor `[rows, cols]` on a signed integer grid of at most 8 bits, as integers:
/// [`Quantizer::fake_quant`] returns exactly `codes[i] / divisors[group of i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct IntCodes {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<i8>,
    /// [`AmaxKind::PerTensor`] (one divisor) or [`AmaxKind::PerRow`] (one per row).
    pub kind: AmaxKind,
    pub divisors: Vec<f32>,
}

/// Where a quantizer's ranges come from.
#[derive(Clone, Copy, Debug)]
pub enum RangeSource<'a> {
    /// The quantizer's own rule: calibrated ranges when it has static ones (given here),
    /// else the tensor's own.
    Calibrated(Option<&'a Amax>),
    /// Max calibration over the tensor itself (weights: ModelOpt calibrates a weight
    /// quantizer on the weight).
    FromTensor,
}

/// The kernels' `[rows, cols]` view of a tensor of these dimensions (leading dimensions
/// are rows).
pub fn rows_cols(dims: &[usize]) -> Result<(usize, usize)> {
    let Some(&cols) = dims.last() else { bail!("cannot fake-quantize a scalar") };
    Ok((dims.iter().product::<usize>().checked_div(cols).unwrap_or(0), cols))
}
