//! Tensor operations of the Qwen3-VL text model and their hand-written backward passes.
//!
//! Forward ops take candle's fused CPU kernels (`rms_norm`, `softmax_last_dim`, `rope`)
//! unless the input is tracked by candle's autograd (a test checks the hand-written
//! backward against autograd), in which case they fall back to differentiable
//! compositions of basic ops.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

/// Whether `dtype` is a 16-bit float: such models compute norms, softmaxes and the loss in
/// f32 (as transformers upcasts them) and everything else in their dtype.
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// `f` on the f32 upcasts of `xs`, its result cast back to the dtype of `xs[0]`.
fn in_f32(xs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    let up: Vec<Tensor> = xs.iter().map(|t| t.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
    Ok(f(&up)?.to_dtype(xs[0].dtype())?)
}

/// RMSNorm over the last dim: `w * x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if is_half(x.dtype()) {
        return in_f32(&[x, w], |t| rms_norm(&t[0], &t[1], eps));
    }
    if x.dtype() == DType::F64 {
        // candle's kernel has no f64 version (and takes `eps` as an f32).
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return Ok(x.broadcast_mul(&r)?.broadcast_mul(w)?);
    }
    if x.track_op() || w.track_op() {
        Ok(candle_nn::ops::rms_norm_slow(x, w, eps as f32)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
    }
}

/// Backward of [`rms_norm`]: `dx = r·g − x·r³·mean(g·x)` with `g = dy·w`,
/// `r = 1/sqrt(mean(x²)+eps)`.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    if is_half(x.dtype()) {
        return in_f32(&[x, w, dy], |t| rms_norm_backward(&t[0], &t[1], eps, &t[2]));
    }
    if let Some(dx) = crate::fused::rms_norm_backward(x, w, eps, dy) {
        return Ok(dx);
    }
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let g = dy.broadcast_mul(w)?;
    let dot = (&g * x)?.mean_keepdim(D::Minus1)?;
    let r3dot = (r.powf(3.0)? * dot)?;
    Ok((g.broadcast_mul(&r)? - x.broadcast_mul(&r3dot)?)?)
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() || x.dtype() == DType::F64 {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }
}

/// Backward of softmax over the last dim given its output `p`.
pub fn softmax_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    if is_half(p.dtype()) {
        return in_f32(&[p, dp], |t| softmax_backward(&t[0], &t[1]));
    }
    if let Some(ds) = crate::fused::softmax_backward(p, dp) {
        return Ok(ds);
    }
    let dot = (dp * p)?.sum_keepdim(D::Minus1)?;
    Ok((p * dp.broadcast_sub(&dot)?)?)
}

/// `x · σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(x)?)
}

/// d silu(x)/dx = σ(x)·(1 + x·(1 − σ(x))).
pub fn silu_grad(x: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(x)?;
    let one_minus = s.affine(-1.0, 1.0)?;
    Ok((&s * (x * one_minus)?.affine(1.0, 1.0)?)?)
}

/// SwiGLU `silu(g)·u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if let Some(a) = crate::fused::swiglu(g, u) {
        return Ok(a);
    }
    Ok((silu(g)? * u)?)
}

/// Backward of [`swiglu`]: `(dg, du)`.
pub fn swiglu_backward(g: &Tensor, u: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(r) = crate::fused::swiglu_backward(g, u, da) {
        return Ok(r);
    }
    Ok(((da * u)?.mul(&silu_grad(g)?)?, (da * silu(g)?)?))
}

/// Rotary tables for positions `0..t`: `(cos, sin)`, each `[t, head_dim/2]`, computed in
/// f32 as transformers does (`inv_freq = 1/θ^(2i/d)`, `freqs = pos·inv_freq`).
///
/// Qwen3-VL's MRoPE takes each frequency from the t, h or w position axis (interleaved or
/// by sections). For text-only input all three axes hold the same positions, so every
/// frequency sees the same position and MRoPE equals this plain RoPE table.
///
/// An f64 model's tables are computed in f64 (the same formulas).
pub fn rope_tables(t: usize, head_dim: usize, theta: f64, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    if dtype == DType::F64 {
        let inv: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        let angles: Vec<f64> = (0..t).flat_map(|p| inv.iter().map(move |f| p as f64 * f)).collect();
        let cos = angles.iter().map(|a| a.cos()).collect::<Vec<_>>();
        let sin = angles.iter().map(|a| a.sin()).collect::<Vec<_>>();
        return Ok((Tensor::from_vec(cos, (t, half), dev)?, Tensor::from_vec(sin, (t, half), dev)?));
    }
    let base = theta as f32;
    let inv: Vec<f32> = (0..half).map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (t, half), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, half), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// M-RoPE tables for per-token 3-D positions (`positions[axis][b·T + t]`, a batch with
/// images): `(cos, sin)`, each `[B, T, head_dim/2]`. Frequency `j` takes its position from
/// axis t, h or w as transformers' `Qwen3VLTextRotaryEmbedding` assigns it: interleaved
/// (`j % 3 == 1` below `3·section[1]` → h, `j % 3 == 2` below `3·section[2]` → w, else t),
/// or by consecutive sections. Angles `pos·inv_freq` in f32 as [`rope_tables`] (f64 in an
/// f64 model).
pub fn mrope_tables(
    positions: &[Vec<u32>; 3],
    (b, t): (usize, usize),
    head_dim: usize,
    theta: f64,
    (section, interleaved): (&[usize], bool),
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let sec = |k: usize| section.get(k).copied().unwrap_or(0);
    let axis = |j: usize| -> usize {
        if interleaved {
            if j % 3 == 1 && j < sec(1) * 3 {
                1
            } else if j % 3 == 2 && j < sec(2) * 3 {
                2
            } else {
                0
            }
        } else if j < sec(0) {
            0
        } else if j < sec(0) + sec(1) {
            1
        } else {
            2
        }
    };
    let axes: Vec<usize> = (0..half).map(axis).collect();
    let n = b * t;
    let pos_at = |axis: usize, r: usize| positions[axis][r];
    if dtype == DType::F64 {
        let inv: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for r in 0..n {
            for (&axis, f) in axes.iter().zip(&inv) {
                let a = f64::from(pos_at(axis, r)) * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        return Ok((Tensor::from_vec(cos, (b, t, half), dev)?, Tensor::from_vec(sin, (b, t, half), dev)?));
    }
    let base = theta as f32;
    let inv: Vec<f32> = (0..half).map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for r in 0..n {
        for (&axis, f) in axes.iter().zip(&inv) {
            let a = pos_at(axis, r) as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (b, t, half), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (b, t, half), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// The queries (or keys) of attention from a q_proj (k_proj) output `raw: [b·t·heads, d]`:
/// per-head RMSNorm with `w`, as `[b, heads, t, d]`, then RoPE with tables `[t, d/2]`.
pub fn qk_norm_rope(
    raw: &Tensor,
    w: &Tensor,
    eps: f64,
    cos: &Tensor,
    sin: &Tensor,
    (b, t, heads): (usize, usize, usize),
) -> Result<Tensor> {
    if !is_half(raw.dtype()) {
        if let Some(y) = crate::fused::qk_norm_rope(raw, w, eps, cos, sin, (b, t, heads)) {
            return Ok(y);
        }
    }
    let d = raw.dim(1)?;
    let x = rms_norm(raw, w, eps)?.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?;
    rope(&x, cos, sin)
}

/// Rotate-half RoPE on `x: [b, h, t, d]` with tables `[t, d/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        Ok(candle_nn::rotary_emb::rope_slow(x, cos, sin)?)
    } else {
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?)
    }
}

/// Backward of [`rope`]: the rotation by −θ, i.e. `rope(dy, cos, −sin)`.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, neg_sin: &Tensor) -> Result<Tensor> {
    rope(dy, cos, neg_sin)
}

/// Attention probabilities `softmax(scale·s + mask)` for `s: [B, Hkv, G, T, T]`; with
/// `zero_empty_rows` (SDPA) rows that see no key are 0.
pub fn masked_softmax(s: &Tensor, scale: f64, masks: &AttnMasks, zero_empty_rows: bool) -> Result<Tensor> {
    if is_half(s.dtype()) {
        let m = AttnMasks {
            additive: masks.additive.to_dtype(DType::F32)?,
            row_valid: masks.row_valid.to_dtype(DType::F32)?,
        };
        return in_f32(&[s], |t| masked_softmax(&t[0], scale, &m, zero_empty_rows));
    }
    if let Some(p) = crate::fused::masked_softmax(s, scale as f32, &masks.additive, zero_empty_rows) {
        return Ok(p);
    }
    let p = softmax_last_dim(&(s * scale)?.broadcast_add(&masks.additive)?)?;
    Ok(if zero_empty_rows { p.broadcast_mul(&masks.row_valid)? } else { p })
}

/// Masks of a left- (or otherwise) padded batch as transformers builds them.
#[derive(Clone)]
pub struct AttnMasks {
    /// Additive mask `[b, 1, 1, t, t]`: 0 where query i may see key j (j ≤ i and j is a
    /// token), the dtype's most negative finite value elsewhere (what transformers' eager
    /// mask adds).
    pub additive: Tensor,
    /// `[b, 1, 1, t, 1]`: 1 where the query row sees at least one key, else 0. Under SDPA
    /// (transformers' default) such fully-masked rows (left pads) output exactly 0.
    pub row_valid: Tensor,
}

impl AttnMasks {
    pub fn new(mask: &[Vec<u32>], t: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let b = mask.len();
        // `finfo(dtype).min`, as transformers: f32::MIN would round to -inf in bf16/f16 and
        // turn the fully masked rows of left pads into NaN.
        let min = match dtype {
            DType::BF16 => half::bf16::MIN.to_f32(),
            DType::F16 => half::f16::MIN.to_f32(),
            _ => f32::MIN,
        };
        let mut add = vec![min; b * t * t];
        let mut valid = vec![0f32; b * t];
        for (bi, row) in mask.iter().enumerate() {
            for i in 0..t {
                let mut any = false;
                for j in 0..=i {
                    if row[j] != 0 {
                        add[(bi * t + i) * t + j] = 0.0;
                        any = true;
                    }
                }
                valid[bi * t + i] = if any { 1.0 } else { 0.0 };
            }
        }
        Ok(AttnMasks {
            additive: Tensor::from_vec(add, (b, 1, 1, t, t), dev)?.to_dtype(dtype)?,
            row_valid: Tensor::from_vec(valid, (b, 1, 1, t, 1), dev)?.to_dtype(dtype)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
        assert!(d / m <= tol, "rel diff {} > {tol}", d / m);
    }

    /// Each hand-written backward agrees with candle autograd on the differentiable form.
    #[test]
    fn backward_ops_match_autograd() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 2, 5, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.2, 8, &dev).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (3, 2, 5, 8), &dev).unwrap();

        let y = rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        close(&rms_norm_backward(x.as_tensor(), &w, 1e-6, &dy).unwrap(), g.get(&x).unwrap(), 1e-5);

        let p = softmax_last_dim(x.as_tensor()).unwrap();
        let g = (&p * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        close(&softmax_backward(&p.detach(), &dy).unwrap(), g.get(&x).unwrap(), 1e-5);

        let s = silu(x.as_tensor()).unwrap();
        let g = (&s * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        close(&(silu_grad(x.as_tensor()).unwrap() * &dy).unwrap(), g.get(&x).unwrap(), 1e-5);

        let (cos, sin) = rope_tables(5, 8, 10000.0, DType::F32, &dev).unwrap();
        let r = rope(x.as_tensor(), &cos, &sin).unwrap();
        let g = (&r * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        close(&rope_backward(&dy, &cos, &sin.neg().unwrap()).unwrap(), g.get(&x).unwrap(), 1e-5);
        // fast and differentiable forms agree
        close(&rope(&x.as_tensor().detach(), &cos, &sin).unwrap(), &r, 1e-6);
    }

    /// The fused kernels agree with the composed candle ops they replace.
    #[test]
    fn fused_kernels_match_composed_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (37, 300), &dev).unwrap();
        let u = Tensor::randn(0f32, 1.0, (37, 300), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (37, 300), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.2, 300, &dev).unwrap();
        let a = crate::fused::swiglu(&x, &u).unwrap();
        close(&a, &(silu(&x).unwrap() * &u).unwrap(), 1e-6);
        let (dg, du) = crate::fused::swiglu_backward(&x, &u, &dy).unwrap();
        close(&dg, &((&dy * &u).unwrap() * silu_grad(&x).unwrap()).unwrap(), 1e-5);
        close(&du, &(&dy * silu(&x).unwrap()).unwrap(), 1e-6);
        let r = crate::fused::rms_norm_backward(&x, &w, 1e-6, &dy).unwrap();
        let v = Var::from_tensor(&x).unwrap();
        let y = rms_norm(v.as_tensor(), &w, 1e-6).unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        close(&r, g.get(&v).unwrap(), 1e-5);
        let p = softmax_last_dim(&x).unwrap();
        let s = crate::fused::softmax_backward(&p, &dy).unwrap();
        let dot = (&dy * &p).unwrap().sum_keepdim(D::Minus1).unwrap();
        close(&s, &(&p * dy.broadcast_sub(&dot).unwrap()).unwrap(), 1e-5);
    }

    #[test]
    fn fused_masked_softmax_matches_composed() {
        let dev = Device::Cpu;
        let s = Tensor::randn(0f32, 3.0, (2, 2, 3, 5, 5), &dev).unwrap();
        let m = AttnMasks::new(&[vec![0, 0, 1, 1, 1], vec![1, 1, 1, 1, 1]], 5, DType::F32, &dev).unwrap();
        for zero in [true, false] {
            let fused = crate::fused::masked_softmax(&s, 0.125, &m.additive, zero).unwrap();
            let p = softmax_last_dim(&(&s * 0.125).unwrap().broadcast_add(&m.additive).unwrap()).unwrap();
            let want = if zero { p.broadcast_mul(&m.row_valid).unwrap() } else { p };
            close(&fused, &want, 1e-6);
        }
    }

    #[test]
    fn masks_follow_left_padding() {
        let m = AttnMasks::new(&[vec![0, 0, 1, 1], vec![1, 1, 1, 1]], 4, DType::F32, &Device::Cpu).unwrap();
        let v = m.row_valid.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0., 0., 1., 1., 1., 1., 1., 1.]);
        let a = m.additive.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // row 0, query 3: keys 2,3 visible
        assert_eq!(&a[12..16], &[f32::MIN, f32::MIN, 0.0, 0.0]);
        // row 1, query 1: keys 0,1 visible
        assert_eq!(&a[16 + 4..16 + 8], &[0.0, 0.0, f32::MIN, f32::MIN]);
    }
}
