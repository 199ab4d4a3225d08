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
