//! The C allocator's settings for scoring on the CPU.
//!
//! A scoring pass keeps each score batch's forward activations while it allocates and
//! frees many temporaries of 1–20 MiB. glibc serves blocks above its mmap threshold
//! (128 KiB, adapting up to 32 MiB) with fresh `mmap`s, and trims the heap top whenever its
//! free top exceeds a threshold that also adapts: with kept blocks interleaved between
//! temporaries it keeps handing pages back to the kernel and faulting them in again. Fixed
//! thresholds turn that adaptation off: freed memory stays in the process for the next
//! temporary. Results do not depend on it; the measured effect is in the README's scoring
//! figures (`scripts/bench_score.sh`).

/// Serves blocks up to 32 MiB (glibc's largest accepted threshold on 64-bit targets) from
/// the heap and keeps up to 1 GiB of freed heap in the process instead of returning it to
/// the kernel (glibc only; a no-op elsewhere). Idempotent; affects the whole process.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: `mallopt` only changes allocator parameters; it takes the arena locks
            // itself and may be called at any time from any thread.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}
