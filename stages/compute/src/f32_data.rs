//! A tensor's values as an `&[f32]`, in place when they already are one: what the fused
//! model kernels, the GEMM, the fake quantizers and the scorer read activations through.

use anyhow::Result;
use candle_core::{CpuStorage, DType, Storage, Tensor};

/// Runs `f` on the values of `t` in place when `t` is a contiguous f32 CPU tensor that
/// autograd does not track; `None` otherwise (the caller falls back to candle ops).
pub fn borrow<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.track_op() || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (o1, o2) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(&v[o1..o2])),
        _ => None,
    }
}

/// [`borrow`] of two tensors at once: `None` unless both can be borrowed.
pub fn borrow2<R>(a: &Tensor, b: &Tensor, f: impl FnOnce(&[f32], &[f32]) -> R) -> Option<R> {
    borrow(a, |a| borrow(b, |b| f(a, b))).flatten()
}

/// [`borrow`] of three tensors at once: `None` unless all three can be borrowed.
pub fn borrow3<R>(a: &Tensor, b: &Tensor, c: &Tensor, f: impl FnOnce(&[f32], &[f32], &[f32]) -> R) -> Option<R> {
    borrow(a, |a| borrow2(b, c, |b, c| f(a, b, c))).flatten()
}

/// Runs `f` on the values of `t` as f32: in place when [`borrow`] applies, else on a
/// converted copy.
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let mut f = Some(f);
    if let Some(r) = borrow(t, |v| f.take().expect("called once")(v)) {
        return Ok(r);
    }
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f.take().expect("not called yet")(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn borrows_contiguous_f32_and_copies_the_rest() {
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        assert_eq!(borrow(&t, |v| v.to_vec()), Some(vec![1.0, 2.0, 3.0, 4.0]));
        assert_eq!(borrow3(&t, &t, &t, |a, b, c| a[3] + b[0] + c[1]), Some(7.0));
        assert_eq!(borrow2(&t, &t.t().unwrap(), |a, _| a[0]), None, "a transposed view is not contiguous");
        let tt = t.t().unwrap();
        assert_eq!(borrow(&tt, |v| v.len()), None);
        assert_eq!(with_values(&tt, |v| v.to_vec()).unwrap(), [1.0, 3.0, 2.0, 4.0]);
        let h = t.to_dtype(DType::BF16).unwrap();
        assert_eq!(with_values(&h, |v| v.to_vec()).unwrap(), [1.0, 2.0, 3.0, 4.0]);
    }
}
