//! Sharing one output buffer between the threads that fill disjoint parts of it.

/// A raw pointer to an output buffer that several threads write, each to its own disjoint
/// range. Constructing one is safe; every write through it is `unsafe` and its caller
/// proves the ranges are disjoint and in bounds.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);

// SAFETY: the pointer is only dereferenced for writes to ranges that no other thread
// touches (each user documents its split), so sharing it across threads races on nothing.
unsafe impl Send for SendPtr {}
// SAFETY: as above: shared references only hand out the pointer value.
unsafe impl Sync for SendPtr {}

/// `Σ` of per-chunk partial sums, combined left to right in chunk order: the same bits
/// whatever the thread count. (rayon's own `sum` combines partials in a tree shaped by how
/// the work happened to be split, so its last bits can depend on the number of threads.)
pub fn ordered_sum(parts: impl rayon::iter::IndexedParallelIterator<Item = f64>) -> f64 {
    let parts: Vec<f64> = parts.collect();
    parts.iter().sum()
}
