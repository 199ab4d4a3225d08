// qpipe's fake-quant kernels: quantize → dequantize on the GPU with the scale computation
// in the kernel, bit-exact with the Rust quantizers in `fake.rs` / `numerics.rs` (which
// follow ModelOpt 0.47). Compiled at run time with NVRTC (`--fmad=false`: no contraction
// of `a * b + c`, so every operation rounds as the Rust code's does).
//
// Every kernel is "one thread per item, plain loops": no shared memory, warps or atomics.
// That keeps them obviously race-free and lets the test suite run this very file on the
// CPU (compiled as C with QPIPE_HOST defined, one loop iteration per thread) against the
// Rust quantizers, on machines without a GPU (`quant::cuda` tests).
//
// Data: `x` is a row-major [rows, cols] f32 tensor; a "group" shares one range (amax):
// kind 0 = the whole tensor, 1 = a row, 2 = a column, 3 = a block of `n` consecutive
// elements of a row (the last block of a row may be shorter).

#ifdef QPIPE_HOST
#include <math.h>
#include <string.h>
static long long qp_tid;
#define QP_KERNEL(name) void name
#define QP_DEV static inline
#define QP_TID qp_tid
static inline unsigned int qp_f2u(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float qp_u2f(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
#else
#define QP_KERNEL(name) extern "C" __global__ void name
#define QP_DEV __device__ static inline
#define QP_TID ((long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x)
#define qp_f2u(f) __float_as_uint(f)
#define qp_u2f(u) __uint_as_float(u)
#endif

// The launch parameters, passed by value (mirrors `KernelArgs` in quant/cuda.rs).
typedef struct {
    long long count;   // threads that do work
    long long rows;
    long long cols;
    long long n;       // block length (kind 3)
    int kind;          // 0 tensor, 1 row, 2 column, 3 block
    int flag;          // qp_int: 1 = unsigned; qp_mx: 1 = E2M1 elements (else E4M3)
    float f0;          // qp_int: max bound;  qp_mx: element max
    float f1;          // qp_int: min bound
} qp_args;

#define QP_E4M3_MAX 448.0f
#define QP_AMAX_EPSILON 5.9604644775390625e-08f  // 2^-24

QP_DEV float qp_pow2(int k) {
    return k >= -126 ? qp_u2f((unsigned int)(k + 127) << 23) : qp_u2f(1u << (k + 149));
}

QP_DEV float qp_clamp(float v, float lo, float hi) {
    // NaN passes through, as Rust's f32::clamp.
    return v < lo ? lo : (v > hi ? hi : v);
}

// Round to FP8 E4M3 (RNE, saturating at ±448), as numerics::round_e4m3.
QP_DEV float qp_round_e4m3(float x) {
    if (x != x) return x;
    float a = fabsf(x);
    if (a >= QP_E4M3_MAX) return copysignf(QP_E4M3_MAX, x);
    int e = a < qp_pow2(-6) ? -6 : (int)((qp_f2u(a) >> 23) & 0xff) - 127;
    float q = rintf(a * qp_pow2(3 - e)) * qp_pow2(e - 3);
    return copysignf(fminf(q, QP_E4M3_MAX), x);
}

// Round a magnitude to FP4 E2M1 (ties to even), as numerics::round_e2m1_magnitude.
QP_DEV float qp_round_e2m1_mag(float a) {
    if (a <= 0.25f) return 0.0f;
    if (a < 0.75f) return 0.5f;
    if (a <= 1.25f) return 1.0f;
    if (a < 1.75f) return 1.5f;
    if (a <= 2.5f) return 2.0f;
    if (a < 3.5f) return 3.0f;
    if (a <= 5.0f) return 4.0f;
    return 6.0f;
}

// E8M0 shared exponent, ModelOpt's "NV" rule (numerics::e8m0_exponent_nv).
QP_DEV int qp_e8m0_exponent_nv(float amax, float elem_max) {
    unsigned int bits = qp_f2u(amax / elem_max);
    int exp_field = (int)((bits >> 23) & 0xff);
    unsigned int sig = bits & 0x7fffffu;
    int round_up = sig > 0 && exp_field != 0xfe && !(exp_field == 0 && sig <= 0x400000u);
    return round_up ? exp_field - 126 : exp_field - 127;
}

// Elements [*start, *stop) of block g (kind 3: blocks of n along each row).
QP_DEV void qp_block(long long g, const qp_args* a, long long* start, long long* stop) {
    long long per_row = (a->cols + a->n - 1) / a->n;
    long long r = g / per_row, b = g % per_row;
    long long end = (b + 1) * a->n < a->cols ? (b + 1) * a->n : a->cols;
    *start = r * a->cols + b * a->n;
    *stop = r * a->cols + end;
}

QP_DEV long long qp_group(long long i, const qp_args* a) {
    long long r = i / a->cols, c = i % a->cols;
    switch (a->kind) {
        case 0: return 0;
        case 1: return r;
        case 2: return c;
        default: return r * ((a->cols + a->n - 1) / a->n) + c / a->n;
    }
}

// ranges[g] = max |x| over group g (thread g); *bad = 1 on NaN/Inf. For kind 0 the host
// first reduces blocks of the flattened tensor (kind 3, rows = 1), then calls qp_amax_reduce.
QP_KERNEL(qp_amax)(const float* x, float* y, float* ranges, unsigned int* bad, qp_args a) {
    long long g = QP_TID;
    if (g >= a.count) return;
    (void)y;
    float m = 0.0f;
    int nonfinite = 0;
    long long start, stop, step;
    if (a.kind == 0) {
        start = 0; stop = a.rows * a.cols; step = 1;
    } else if (a.kind == 1) {
        start = g * a.cols; stop = start + a.cols; step = 1;
    } else if (a.kind == 2) {
        start = g; stop = a.rows * a.cols; step = a.cols;
    } else {
        qp_block(g, &a, &start, &stop); step = 1;
    }
    for (long long i = start; i < stop; i += step) {
        float v = x[i];
        if (!isfinite(v)) nonfinite = 1;
        m = fmaxf(m, fabsf(v));
    }
    ranges[g] = m;
    if (nonfinite) *bad = 1;
}

// ranges[0] = max(ranges[0 .. count]) (one thread).
QP_KERNEL(qp_amax_reduce)(const float* x, float* y, float* ranges, unsigned int* bad, qp_args a) {
    if (QP_TID != 0) return;
    (void)x; (void)y; (void)bad;
    float m = 0.0f;
    for (long long i = 0; i < a.count; i++) m = fmaxf(m, ranges[i]);
    ranges[0] = m;
}

// Integer fake quantization (fake.rs int_qdq), one thread per element:
// scale = max_bound / amax; clamp(rne(x·scale), min_bound, max_bound) / scale; amax ≤ 2^-24 → 0.
QP_KERNEL(qp_int)(const float* x, float* y, float* ranges, unsigned int* bad, qp_args a) {
    long long i = QP_TID;
    if (i >= a.count) return;
    (void)bad;
    float amax = ranges[qp_group(i, &a)];
    float s = 0.0f, d = 1.0f;
    if (amax > QP_AMAX_EPSILON) {
        s = a.f0 / amax;
        d = s;
    }
    y[i] = rintf(qp_clamp(x[i] * s, a.f1, a.f0)) / d;
}

// FP8 E4M3 fake quantization (fake.rs fp8_qdq), one thread per element.
QP_KERNEL(qp_fp8)(const float* x, float* y, float* ranges, unsigned int* bad, qp_args a) {
    long long i = QP_TID;
    if (i >= a.count) return;
    (void)bad;
    float amax = ranges[qp_group(i, &a)];
    float safe = amax <= QP_AMAX_EPSILON ? 1.0f : amax;
    float s = (1.0f / safe) * QP_E4M3_MAX;
    float inv = 1.0f / s;
    y[i] = qp_round_e4m3(qp_clamp(x[i] * s, -QP_E4M3_MAX, QP_E4M3_MAX)) * inv;
}

// NVFP4 (fake.rs nvfp4_qdq), one thread per block of n elements of a row;
// ranges[0] = the global amax.
QP_KERNEL(qp_nvfp4)(const float* x, float* y, float* ranges, unsigned int* bad, qp_args a) {
    long long g = QP_TID;
    if (g >= a.count) return;
    (void)bad;
    float gs = ranges[0] * (1.0f / 2688.0f);
    if (!(gs > 0.0f)) gs = 1e-12f;
    float six_g = 6.0f * gs;
    long long start, stop;
    qp_block(g, &a, &start, &stop);
    float m = 0.0f;
    for (long long i = start; i < stop; i++) m = fmaxf(m, fabsf(x[i]));
    float sq = qp_round_e4m3(fminf(m / six_g, QP_E4M3_MAX)) * gs;
    if (sq != sq || sq < 1e-5f) sq = 1.0f;
    for (long long i = start; i < stop; i++) {
        float v = x[i];
        float q = qp_round_e2m1_mag(fabsf(v) / sq) * sq;
        y[i] = v >= 0.0f ? q : -q;
    }
}

// OCP MX (fake.rs mx_qdq), one thread per block: E8M0 scale, E2M1 (flag 1) or E4M3 elements.
QP_KERNEL(qp_mx)(const float* x, float* y, float* ranges, unsigned int* bad, qp_args a) {
    long long g = QP_TID;
    if (g >= a.count) return;
    (void)ranges; (void)bad;
    long long start, stop;
    qp_block(g, &a, &start, &stop);
    float m = 0.0f;
    for (long long i = start; i < stop; i++) m = fmaxf(m, fabsf(x[i]));
    float scale = 1.0f, unscale = 1.0f;
    if (m != 0.0f && isfinite(m)) {
        int e = qp_e8m0_exponent_nv(m, a.f0);
        scale = qp_pow2(-e);
        unscale = qp_pow2(e);
    }
    for (long long i = start; i < stop; i++) {
        float v = x[i];
        float t = fabsf(v) * scale;
        float q = (a.flag ? qp_round_e2m1_mag(t) : qp_round_e4m3(t)) * unscale;
        y[i] = v < 0.0f ? -q : q;
    }
}
