/* The storage types of the CPU kernels and their float32 loads and stores. */
#ifndef LORAFLEET_CPU_TYPES_H
#define LORAFLEET_CPU_TYPES_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;
typedef _Float16 f16;

static inline float load_f32(const float *p) { return *p; }
static inline void store_f32(float *p, float v) { *p = v; }

static inline float load_bf16(const bf16 *p) {
    uint32_t u = (uint32_t)(*p) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline void store_bf16(bf16 *p, float v) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        *p = (bf16)((u >> 16) | 0x40u);  /* quiet NaN */
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    *p = (bf16)(u >> 16);
}

static inline float load_f16(const f16 *p) { return (float)(*p); }
static inline void store_f16(f16 *p, float v) { *p = (f16)v; }

/* Native bfloat16 dot products (vdpbf16ps), decided when the library is compiled: the build uses
 * -march=native and the library's cache key includes the CPU's flags, so a library with them runs
 * only on a CPU that has them. Without them the generic float32-converting loops are compiled. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__) && !defined(LORAFLEET_NO_NATIVE_BF16)
#define LORAFLEET_NATIVE_BF16 1
#include <immintrin.h>
/* the low n (0..32) lanes of a 32-lane mask */
static inline __mmask32 lanes_mask(int64_t n) { return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u); }
#else
#define LORAFLEET_NATIVE_BF16 0
#endif

#endif
