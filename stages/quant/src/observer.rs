//! Ranges: where an amax lives ([`AmaxKind`]), computing it from a tensor, and the
//! max-calibration accumulator ([`AmaxObserver`], ModelOpt's `MaxCalibrator`).

use anyhow::{bail, Result};
use rayon::prelude::*;

/// Which elements of a 2-D tensor `[rows, cols]` share one amax. Weights are `[out, in]`,
/// activations `[tokens, in]` (all leading dimensions flattened).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmaxKind {
    /// One range for the whole tensor (`axis: None`).
    PerTensor,
    /// One range per row: per output channel of a weight (`axis: 0`), per token of an
    /// activation (`block_sizes: {-1: None}`).
    PerRow,
    /// One range per column: per input channel (`axis: 1` / `-1`).
    PerCol,
    /// One range per block of this many consecutive elements of a row (`block_sizes:
    /// {-1: n}`); a last, shorter block when `n` does not divide `cols` (ModelOpt pads with
    /// zeros, which does not change a block's max).
    PerBlock(usize),
}

impl AmaxKind {
    /// Number of ranges for a `[rows, cols]` tensor.
    pub fn len(self, rows: usize, cols: usize) -> usize {
        match self {
            AmaxKind::PerTensor => 1,
            AmaxKind::PerRow => rows,
            AmaxKind::PerCol => cols,
            AmaxKind::PerBlock(n) => rows * cols.div_ceil(n),
        }
    }

    /// Ranges of `x` `[rows, cols]` (max |x| per group), and whether `x` had a NaN or ±inf.
    pub fn reduce(self, x: &[f32], rows: usize, cols: usize) -> (Vec<f32>, bool) {
        assert_eq!(x.len(), rows * cols, "tensor of {} elements is not [{rows}, {cols}]", x.len());
        match self {
            AmaxKind::PerTensor => {
                let (m, bad) =
                    x.par_chunks(1 << 15).map(abs_max).reduce(|| (0.0, false), |(a, x), (b, y)| (a.max(b), x || y));
                (vec![m], bad)
            }
            AmaxKind::PerRow => {
                let v: Vec<(f32, bool)> = x.par_chunks(cols.max(1)).map(abs_max).collect();
                let bad = v.iter().any(|p| p.1);
                (v.into_iter().map(|p| p.0).collect(), bad)
            }
            AmaxKind::PerCol => {
                let mut m = vec![0.0f32; cols];
                let mut bad = false;
                for row in x.chunks(cols.max(1)) {
                    for (a, v) in m.iter_mut().zip(row) {
                        *a = a.max(v.abs());
                        bad |= !v.is_finite();
                    }
                }
                (m, bad)
            }
            AmaxKind::PerBlock(n) => {
                let per_row: Vec<(Vec<f32>, bool)> = x
                    .par_chunks(cols.max(1))
                    .map(|row| {
                        let mut bad = false;
                        let v = row
                            .chunks(n)
                            .map(|b| {
                                let (m, b_bad) = abs_max(b);
                                bad |= b_bad;
                                m
                            })
                            .collect();
                        (v, bad)
                    })
                    .collect();
                let bad = per_row.iter().any(|p| p.1);
                (per_row.into_iter().flat_map(|p| p.0).collect(), bad)
            }
        }
    }
}

/// `max |v|` and whether `v` has a NaN or ±inf, in one pass the compiler vectorizes
/// (lane-wise maxima and flags from the bits, no early exit).
fn abs_max(v: &[f32]) -> (f32, bool) {
    const LANES: usize = 16;
    let (mut m, mut bad) = ([0f32; LANES], [0u32; LANES]);
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks.chain(std::iter::once(rest)) {
        for ((x, m), bad) in c.iter().zip(&mut m).zip(&mut bad) {
            let bits = x.to_bits() & 0x7fff_ffff;
            *bad |= u32::from(bits >= 0x7f80_0000); // exponent all ones: inf or NaN
            let a = f32::from_bits(bits);
            *m = if a > *m { a } else { *m };
        }
    }
    (m.iter().fold(0f32, |a, &b| a.max(b)), bad.iter().any(|&b| b != 0))
}

/// Calibrated (static) ranges of one quantizer.
#[derive(Clone, Debug, PartialEq)]
pub struct Amax {
    pub kind: AmaxKind,
    /// One amax per group, in [`AmaxKind`] order (row-major for blocks).
    pub values: Vec<f32>,
}

impl Amax {
    /// A per-tensor range.
    pub fn per_tensor(v: f32) -> Self {
        Self { kind: AmaxKind::PerTensor, values: vec![v] }
    }
}

/// Max calibration ("max" calibrator): amax = max |x| over every batch it observes, per
/// tensor or per the quantizer's groups. Errors on NaN/inf (the caller adds which layer).
#[derive(Clone, Debug)]
pub struct AmaxObserver {
    kind: AmaxKind,
    values: Option<Vec<f32>>,
    batches: usize,
}

impl AmaxObserver {
    pub fn new(kind: AmaxKind) -> Self {
        Self { kind, values: None, batches: 0 }
    }

    pub fn kind(&self) -> AmaxKind {
        self.kind
    }

    /// Number of batches observed so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Folds one batch `[rows, cols]` into the running max.
    pub fn observe(&mut self, x: &[f32], rows: usize, cols: usize) -> Result<()> {
        if x.len() != rows * cols {
            bail!("calibration batch has {} elements, expected [{rows}, {cols}]", x.len());
        }
        let (local, bad) = self.kind.reduce(x, rows, cols);
        if bad {
            bail!("calibration batch {} contains NaN or infinite values", self.batches);
        }
        self.observe_ranges(local, rows, cols)
    }

    /// Folds one batch's ranges (of a `[rows, cols]` tensor, [`AmaxKind::reduce`] of it,
    /// computed elsewhere — on the GPU) into the running max.
    pub fn observe_ranges(&mut self, local: Vec<f32>, rows: usize, cols: usize) -> Result<()> {
        match &mut self.values {
            None => self.values = Some(local),
            Some(v) if v.len() != local.len() => bail!(
                "calibration batch {} has {} ranges ({:?} of [{rows}, {cols}]), earlier batches had {}",
                self.batches,
                local.len(),
                self.kind,
                v.len()
            ),
            Some(v) => v.iter_mut().zip(local).for_each(|(a, b)| *a = a.max(b)),
        }
        self.batches += 1;
        Ok(())
    }

    /// The calibrated ranges, `None` before any batch.
    pub fn amax(&self) -> Option<Amax> {
        self.values.as_ref().map(|v| Amax { kind: self.kind, values: v.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observer_keeps_the_max_over_batches() {
        let mut o = AmaxObserver::new(AmaxKind::PerTensor);
        assert!(o.amax().is_none());
        o.observe(&[1.0, -3.0, 2.0, 0.5], 2, 2).unwrap();
        o.observe(&[-2.5, 1.0], 1, 2).unwrap();
        assert_eq!(o.amax().unwrap(), Amax::per_tensor(3.0));
        o.observe(&[-7.0, 1.0, 0.0], 1, 3).unwrap();
        assert_eq!(o.amax().unwrap().values, vec![7.0]);
        assert_eq!(o.batches(), 3);

        let mut c = AmaxObserver::new(AmaxKind::PerCol);
        c.observe(&[1.0, -3.0, 2.0, 0.5], 2, 2).unwrap();
        c.observe(&[-4.0, 0.0], 1, 2).unwrap();
        assert_eq!(c.amax().unwrap().values, vec![4.0, 3.0]);
        assert!(c.observe(&[1.0, 2.0, 3.0], 1, 3).is_err(), "shape change");
        assert!(c.observe(&[f32::NAN, 1.0], 1, 2).unwrap_err().to_string().contains("NaN"));
    }

    #[test]
    fn group_reductions() {
        let x = [1.0, -2.0, 3.0, 0.0, -5.0, 4.0, 0.5, 0.25, -0.0, 6.0];
        assert_eq!(AmaxKind::PerRow.reduce(&x, 2, 5).0, vec![5.0, 6.0]);
        assert_eq!(AmaxKind::PerCol.reduce(&x, 2, 5).0, vec![4.0, 2.0, 3.0, 0.0, 6.0]);
        assert_eq!(AmaxKind::PerBlock(2).reduce(&x, 2, 5).0, vec![2.0, 3.0, 5.0, 4.0, 0.25, 6.0]);
        assert_eq!(AmaxKind::PerBlock(2).len(2, 5), 6, "ragged last block");
        assert!(AmaxKind::PerTensor.reduce(&[1.0, f32::INFINITY], 1, 2).1);
    }
}
