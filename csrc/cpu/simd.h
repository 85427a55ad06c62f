// 8-wide float helpers for the CPU kernels: AVX + FMA (+ F16C for fp16); where the CPU has AVX2
// the hot loops are compiled a second time (the *_simd.inc files) with an exp that builds 2^n
// with 256-bit integer ops instead of two SSE halves.
//
// Why our own: ATen's Vectorized<> is compiled per CPU capability inside libtorch and its AVX2
// path needs AVX2; CI machines here have AVX + FMA only, where ATen falls back to scalar loops.
// Functions that use these helpers carry TD_AVX_TARGET and are only called after
// cpu_has_avx_fma() says the CPU can run them; everything else has a scalar twin.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define TD_HAVE_X86 1
#include <immintrin.h>
#define TD_AVX_TARGET __attribute__((target("avx,fma,f16c,sse4.1")))
#define TD_AVX2_TARGET __attribute__((target("avx2,avx,fma,f16c,sse4.1")))
#else
#define TD_AVX2_TARGET
#define TD_HAVE_X86 0
#define TD_AVX_TARGET
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace topk_distill {
namespace cpu {

inline bool cpu_has_avx_fma() {
#if TD_HAVE_X86
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("sse4.1") &&
                         std::getenv("TOPK_DISTILL_CPU_SCALAR") == nullptr;
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_avx2() {
#if TD_HAVE_X86
  static const bool ok = cpu_has_avx_fma() && __builtin_cpu_supports("avx2") &&
                         std::getenv("TOPK_DISTILL_CPU_NO_AVX2") == nullptr;
  return ok;
#else
  return false;
#endif
}

#if TD_HAVE_X86

// exp(r) for |r| <= ln2/2 (Cephes' degree-6 polynomial) and n = round(x / ln2), for the exp
// functions below: they differ only in how they build 2^n.
struct Exp8Parts {
  __m256 poly;  // exp(r)
  __m256 n;     // x = n ln2 + r
};
TD_AVX_TARGET inline Exp8Parts exp8_parts(__m256 xc) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  return {_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f))), n};
}

constexpr float kExp8Lowest = -87.3365478515625f;

// exp(x) for 8 floats x <= ~0, the only arguments the kernels produce (z/T - max - log-sum).
// x = n ln2 + r, |r| <= ln2/2, exp(r) by the polynomial above (about 1 ulp), 2^n built in the
// exponent bits. Results below ~1.2e-38 flush to exactly 0 (so a tail of far-below-max logits
// sums to 0, as in float64, not to V * FLT_MIN); NaN stays NaN. No overflow handling: x > 88 is
// outside the contract.
TD_AVX_TARGET inline __m256 exp8_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExp8Lowest);
  const Exp8Parts e = exp8_parts(_mm256_max_ps(lo, x));  // max_ps returns its 2nd operand for NaN
  // 2^n: (n + 127) << 23, in two SSE halves (AVX1 has no 256-bit integer shifts).
  const __m256i ni = _mm256_cvtps_epi32(e.n);
  const __m128i bias = _mm_set1_epi32(127);
  const __m128i e_lo = _mm_slli_epi32(_mm_add_epi32(_mm256_castsi256_si128(ni), bias), 23);
  const __m128i e_hi = _mm_slli_epi32(_mm_add_epi32(_mm256_extractf128_si256(ni, 1), bias), 23);
  const __m256 y = _mm256_mul_ps(e.poly, _mm256_castsi256_ps(_mm256_set_m128i(e_hi, e_lo)));
  return _mm256_and_ps(y, _mm256_cmp_ps(x, lo, _CMP_NLT_UQ));  // x < lo -> 0; NaN kept
}

// The same exp with AVX2: 2^n as one 256-bit integer add and shift.
TD_AVX2_TARGET inline __m256 exp8_nonpositive_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExp8Lowest);
  const Exp8Parts e = exp8_parts(_mm256_max_ps(lo, x));
  const __m256i pow2n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(e.n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(e.poly, _mm256_castsi256_ps(pow2n));
  return _mm256_and_ps(y, _mm256_cmp_ps(x, lo, _CMP_NLT_UQ));
}

// Loads 8 consecutive elements as floats.
TD_AVX_TARGET inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TD_AVX_TARGET inline __m256 load8(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i z = _mm_setzero_si128();
  return _mm256_castsi256_ps(_mm256_set_m128i(_mm_unpackhi_epi16(z, v), _mm_unpacklo_epi16(z, v)));
}
TD_AVX_TARGET inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Stores 8 floats, rounding to nearest even for the 16-bit types (as c10's conversions do).
TD_AVX_TARGET inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
TD_AVX_TARGET inline __m128i bf16_round4(__m128i u) {
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
  return _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7FFF)), lsb), 16);
}
TD_AVX_TARGET inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  __m128i lo = bf16_round4(_mm256_castsi256_si128(u));
  __m128i hi = bf16_round4(_mm256_extractf128_si256(u, 1));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m128i qnan = _mm_set1_epi32(0x7FC0);
  lo = _mm_blendv_epi8(lo, qnan, _mm_castps_si128(_mm256_castps256_ps128(nan)));
  hi = _mm_blendv_epi8(hi, qnan, _mm_castps_si128(_mm256_extractf128_ps(nan, 1)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(lo, hi));
}
TD_AVX_TARGET inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

TD_AVX_TARGET inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
TD_AVX_TARGET inline float hmax8(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

#endif  // TD_HAVE_X86

}  // namespace cpu
}  // namespace topk_distill
