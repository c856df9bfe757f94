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
#if defined(__AVX512F__)
#include <immintrin.h>
/* the low n lanes of a 32-lane mask: none for n <= 0, all for n >= 32 */
static inline __mmask32 lanes_mask(int64_t n) {
    return n <= 0 ? (__mmask32)0 : n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u);
}
/* the low n lanes of a 16-lane mask: none for n <= 0, all for n >= 16 */
static inline __mmask16 lanes_mask16(int64_t n) {
    return n <= 0 ? (__mmask16)0 : n >= 16 ? (__mmask16)0xffffu : (__mmask16)((1u << n) - 1u);
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__) && !defined(LORAFLEET_NO_NATIVE_BF16)
#define LORAFLEET_NATIVE_BF16 1
/* 16 bf16 <-> 16 float32: the 16 bits go to the top of each lane; vcvtneps2bf16 rounds to nearest
 * even (torch's rounding, except that float32 subnormals flush to zero). m: the lanes read or written. */
static inline __m512 widen16_bf16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
static inline __m512 load16_bf16(const bf16 *p, __mmask16 m) { return widen16_bf16(_mm256_maskz_loadu_epi16(m, p)); }
static inline __m256i narrow16_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
static inline void store16_bf16(bf16 *p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow16_bf16(v)); }
#else
#define LORAFLEET_NATIVE_BF16 0
#endif

#endif
