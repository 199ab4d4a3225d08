//! The C allocator's settings for scoring on the CPU.
//!
//! A `gradient` scoring pass keeps each score batch's forward activations (about 200 MiB
//! on the mid-size benchmark model) while it allocates and frees many temporaries of
//! 1–20 MiB. glibc's malloc adapts its mmap threshold to the largest block freed and then
//! trims the heap whenever its free top exceeds twice that; with kept blocks interleaved
//! between temporaries it keeps handing pages back to the kernel and taking them again,
//! and on a 2-core VM those system calls and TLB shootdowns doubled the time of a kept
//! forward (0.45 s → 0.8–0.95 s per batch, `scripts/bench_score.sh`). A fixed trim
//! threshold turns that adaptation off: freed memory stays in the process for the next
//! temporary, and the peak resident memory is unchanged (1.25 GB either way on the
//! benchmark).

/// Keeps up to 1 GiB of freed heap in the process instead of returning it to the kernel
/// (glibc only; a no-op elsewhere). Idempotent; affects the whole process.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: `mallopt` only changes allocator parameters; it takes the arena locks
            // itself and may be called at any time from any thread.
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}
