//! Element-wise kernels compiled twice: for the baseline x86-64 target and for AVX-512,
//! chosen at run time (see [`avx512_dispatch`]).

/// `fn name(args) = imp;` defines `name`, which runs `imp` (an `#[inline(always)]` kernel)
/// compiled for AVX-512 when the CPU has it — masked selects and 16 lanes where the
/// baseline x86-64 build has branches and 4 — and as built otherwise. The same IEEE
/// operations either way, so the same bits.
#[macro_export]
macro_rules! avx512_dispatch {
    ($(#[doc = $d:literal])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $imp:ident;) => {
        $(#[doc = $d])*
        fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn fast($($a: $t),*) $(-> $r)? {
                    $imp($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F is available (checked just above).
                    return unsafe { fast($($a),*) };
                }
            }
            $imp($($a),*)
        }
    };
}
