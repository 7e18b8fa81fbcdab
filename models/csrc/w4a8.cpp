// W4A8 matmul for CPU decode and prefill: int4 weight codes x int8 activations, int32 dot products.
//
// y[m, n] = sum_g s[g, n] * (sum_{b in g} dx[m, b] * sum_{k in b} q[n, k] * xq[m, k] - z[g, n] * c[m, g]),
// c[m, g] = sum_{b in g} dx[m, b] * sum_{k in b} xq[m, k],
// with w[n, k] = s[g, n] * (q[n, k] - z[g, n]) (the GPTQ/AWQ convention, weight groups g) and
// x[m, k] ~= dx[m, b] * xq[m, k] (xq int8, one scale per row and activation block b of `act_block` k inside a
// weight group, round half to even). Integer sums are exact, so the only difference from a dense matmul on the
// dequantized weight is the activation rounding; models/w4a8.py holds the plain-PyTorch reference, the packing
// and the build.
//
// Layout (models/w4a8.py `pack`): blocks of 16 output columns.
//   packed (N/16, K/8, 64) uint8: byte j of block kb holds column j/4; its low nibble is k = 8*kb + j%4 and its
//     high nibble k = 8*kb + 4 + j%4. So one 64-byte load gives 16 columns x 4 k twice, the operand shape of
//     AVX-512 VNNI's vpdpbusd (unsigned codes x signed activations, 4 products per int32 lane).
//   scales (N/16, G, 16) float16, zeros (N/16, G, 16) uint8.
// The rounded activations are block-major, xq (K / act_block, M, act_block): one block of every row lies together,
// so a kernel walks all its rows with one pointer. Rounding and the matmul run in one OpenMP team (`two_phases`).
// The instruction set is chosen at build time (models/w4a8.py passes the flags): AVX-512 VNNI, AVX2 or plain
// C++. JETSERVE_W4A8_NS names the op namespace so that several builds can be loaded in one process.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define W4A8_AVX512VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define W4A8_AVX2 1
#include <immintrin.h>
#endif

// AMX tiles (Linux: the process asks the kernel for tile data once, see amx_permitted)
#if defined(W4A8_AVX512VNNI) && defined(__linux__) && defined(__has_include)
#if __has_include(<amxtileintrin.h>)
#define W4A8_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#ifndef JETSERVE_W4A8_NS
#define JETSERVE_W4A8_NS jetserve_w4a8
#endif

namespace {

constexpr int kCols = 16;  // output columns per block
constexpr int kBlockK = 8;  // k per 64-byte packed block
// bytes of packed weight prefetched ahead of the matmul loops (a thread reads its blocks in address order; past
// the end is harmless, prefetches do not fault); docs/benchmarks.md
constexpr int64_t kAhead = 4096;

// Rounds one block of `ab` activations to int8 (scale max|x| / 127, round half to even): returns the block's
// scale and writes the codes to q and their sum to *sum. The scalar version is the definition; the vector one
// (blocks that are a multiple of 8, AVX-512 and AVX2 builds) computes exactly the same (IEEE division and
// multiplication, round to nearest even).
template <typename T>
inline float quantize_block_scalar(const T* x, int64_t ab, int8_t* q, int32_t* sum) {
  float amax = 0.f;
  for (int64_t k = 0; k < ab; ++k) amax = std::max(amax, std::fabs(static_cast<float>(x[k])));
  *sum = 0;
  if (amax == 0.f) {
    std::memset(q, 0, ab);
    return 0.f;
  }
  const float inv = 127.f / amax;
  for (int64_t k = 0; k < ab; ++k) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(static_cast<float>(x[k]) * inv));
    q[k] = static_cast<int8_t>(v);
    *sum += v;
  }
  return amax / 127.f;
}

#if defined(W4A8_AVX512VNNI) || defined(W4A8_AVX2)
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const c10::BFloat16* x) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

template <typename T>
inline float quantize_block(const T* x, int64_t ab, int8_t* q, int32_t* sum) {
  if (ab % 8) return quantize_block_scalar(x, ab, q, sum);
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 a = _mm256_setzero_ps();
  for (int64_t k = 0; k < ab; k += 8) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, load8(x + k)));
  a = _mm256_max_ps(a, _mm256_permute_ps(a, 0xB1));  // swap neighbours
  a = _mm256_max_ps(a, _mm256_permute_ps(a, 0x4E));  // swap pairs
  a = _mm256_max_ps(a, _mm256_permute2f128_ps(a, a, 0x01));  // swap halves: every lane holds max|x|
  const float amax = _mm256_cvtss_f32(a);
  if (amax == 0.f) {
    std::memset(q, 0, ab);
    *sum = 0;
    return 0.f;
  }
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(127.f), a);
  __m128i t = _mm_setzero_si128();
  for (int64_t k = 0; k < ab; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(load8(x + k), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i qi = _mm256_cvtps_epi32(r);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));  // 8 x int16
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
    t = _mm_add_epi32(t, _mm_madd_epi16(w, _mm_set1_epi16(1)));  // 4 x int32
  }
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  *sum = _mm_cvtsi128_si32(t);
  return amax / 127.f;
}
#else
template <typename T>
inline float quantize_block(const T* x, int64_t ab, int8_t* q, int32_t* sum) {
  return quantize_block_scalar(x, ab, q, sum);
}
#endif

#if defined(W4A8_AVX512VNNI)
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

// Two adjacent blocks of 8, as quantize_block rounds them (one block per 256-bit half): codes to q0 and q1,
// scales to d[0..1], code sums to sum[0..1].
template <typename T>
inline void quantize_pair8(const T* x, int8_t* q0, int8_t* q1, float* d, int32_t* sum) {
  const __m512 v = load16(x);
  __m512 a = _mm512_abs_ps(v);
  a = _mm512_max_ps(a, _mm512_permute_ps(a, 0xB1));  // swap neighbours
  a = _mm512_max_ps(a, _mm512_permute_ps(a, 0x4E));  // swap pairs
  a = _mm512_max_ps(a, _mm512_shuffle_f32x4(a, a, 0xB1));  // swap 128-bit halves: each lane holds its block's max
  const __mmask16 nz = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_OQ);
  const __m512 inv = _mm512_maskz_div_ps(nz, _mm512_set1_ps(127.f), a);
  const __m512i qi = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i b = _mm512_cvtsepi32_epi8(qi);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q0), b);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q1), _mm_unpackhi_epi64(b, b));
  __m512i t = _mm512_add_epi32(qi, _mm512_shuffle_epi32(qi, _MM_PERM_BADC));
  t = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_CDAB));
  t = _mm512_add_epi32(t, _mm512_shuffle_i32x4(t, t, 0xB1));
  sum[0] = _mm_cvtsi128_si32(_mm512_castsi512_si128(t));
  sum[1] = _mm_cvtsi128_si32(_mm512_extracti32x4_epi32(t, 2));
  d[0] = _mm512_cvtss_f32(a) / 127.f;
  d[1] = _mm_cvtss_f32(_mm512_extractf32x4_ps(a, 2)) / 127.f;
}
#endif

// Rounds the activations of tasks [t0, t1), task i = (group i / M, row i % M), into the block-major layout the
// kernels read: xq (B, M, ab) int8, dx (B, M) and c (G, M) float32 (B = K / ab blocks, G = K / gs groups).
template <typename T>
void quantize_tasks(const T* x, int64_t M, int64_t K, int64_t gs, int64_t ab, int8_t* xq, float* dx, float* c,
                    int64_t t0, int64_t t1) {
  const int64_t per_g = gs / ab;
  for (int64_t i = t0; i < t1; ++i) {
    const int64_t g = i / M, m = i % M;
    float cs = 0.f;
    int64_t b = g * per_g;
    const int64_t end = b + per_g;
#if defined(W4A8_AVX512VNNI)
    if (ab == 8) {
      for (; b + 2 <= end; b += 2) {
        float d[2];
        int32_t sum[2];
        quantize_pair8(x + m * K + b * 8, xq + (b * M + m) * 8, xq + ((b + 1) * M + m) * 8, d, sum);
        dx[b * M + m] = d[0];
        dx[(b + 1) * M + m] = d[1];
        cs = std::fma(d[0], static_cast<float>(sum[0]), cs);
        cs = std::fma(d[1], static_cast<float>(sum[1]), cs);
      }
    }
#endif
    for (; b < end; ++b) {
      int32_t sum;
      const float d = quantize_block(x + m * K + b * ab, ab, xq + (b * M + m) * ab, &sum);
      dx[b * M + m] = d;
      cs = std::fma(d, static_cast<float>(sum), cs);  // explicit: contraction would vary with the inlining
    }
    c[g * M + m] = cs;
  }
}

struct Args {
  const uint8_t* wp;  // this block's packed codes, (K/8, 64)
  const c10::Half* sc;  // this block's scales, (G, 16)
  const uint8_t* zp;  // this block's zeros, (G, 16)
  const int8_t* xq;  // the chunk's first row in block 0; row m of block b at xq + (b * ld + m) * ab
  const float* dx;  // the chunk's first row: dx[b * ld + m]
  const float* c;  // the chunk's first row: c[g * ld + m]
  int64_t K, G, gs, ab;
  int64_t ld;  // rows of the whole layout (quantize_tasks's M)
  float* out;  // (rows, 16) float scratch
  const float* fs;  // W8: this block's 16 per-column scales
};

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(W4A8_AVX512VNNI)
constexpr int kMaxRows = 8;

// KB: k-blocks of 8 per activation block when known at compile time (the default act_block 8: KB = 1), else 0
template <int M, int KB>
void block_rows(const Args& a) {
  constexpr bool kSplit = M <= 4;  // two dot chains per row where registers allow (vpdpbusd latency)
  __m512 facc[M], gacc[M];
  for (int m = 0; m < M; ++m) facc[m] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const int64_t kb_per_b = KB ? KB : a.ab / kBlockK, ab = kb_per_b * kBlockK, per_g = a.gs / ab;
  const uint8_t* wb = a.wp;
  const int8_t* xb = a.xq;
  const float* db = a.dx;
  for (int64_t g = 0; g < a.G; ++g) {
    for (int m = 0; m < M; ++m) gacc[m] = _mm512_setzero_ps();
    for (int64_t bi = 0; bi < per_g; ++bi, xb += a.ld * ab, db += a.ld) {
      __m512i lo_acc[M], hi_acc[M];
      for (int m = 0; m < M; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_si512();
      for (int64_t kb = 0; kb < kb_per_b; ++kb, wb += 64) {
        __builtin_prefetch(wb + kAhead);
        const __m512i p = _mm512_loadu_si512(wb);
        const __m512i lo = _mm512_and_si512(p, mask);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), mask);
        for (int m = 0; m < M; ++m) {
          const int8_t* xk = xb + m * ab + kb * kBlockK;
          lo_acc[m] = _mm512_dpbusd_epi32(lo_acc[m], lo, _mm512_set1_epi32(load4(xk)));
          if (kSplit) {
            hi_acc[m] = _mm512_dpbusd_epi32(hi_acc[m], hi, _mm512_set1_epi32(load4(xk + 4)));
          } else {
            lo_acc[m] = _mm512_dpbusd_epi32(lo_acc[m], hi, _mm512_set1_epi32(load4(xk + 4)));
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m512i dot = kSplit ? _mm512_add_epi32(lo_acc[m], hi_acc[m]) : lo_acc[m];
        gacc[m] = _mm512_fmadd_ps(_mm512_set1_ps(db[m]), _mm512_cvtepi32_ps(dot), gacc[m]);
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.sc + g * kCols)));
    const __m512 z =
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zp + g * kCols))));
    for (int m = 0; m < M; ++m) {
      const __m512 t = _mm512_fnmadd_ps(z, _mm512_set1_ps(a.c[g * a.ld + m]), gacc[m]);
      facc[m] = _mm512_fmadd_ps(s, t, facc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(a.out + m * kCols, facc[m]);
}

// W8: packed codes are c + 128 (uint8), so the int32 dot is off by 128 * sum(xq), taken out with c[m].
template <int M>
void block_rows_w8(const Args& a) {
  __m512 gacc[M];
  for (int m = 0; m < M; ++m) gacc[m] = _mm512_setzero_ps();
  const int64_t q_per_b = a.ab / 4, B = a.K / a.ab;
  const uint8_t* wb = a.wp;
  const int8_t* xb = a.xq;
  const float* db = a.dx;
  for (int64_t bi = 0; bi < B; ++bi, xb += a.ld * a.ab, db += a.ld) {
    __m512i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t q = 0; q < q_per_b; ++q, wb += 64) {
      __builtin_prefetch(wb + kAhead);
      const __m512i p = _mm512_loadu_si512(wb);
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_dpbusd_epi32(acc[m], p, _mm512_set1_epi32(load4(xb + m * a.ab + q * 4)));
    }
    for (int m = 0; m < M; ++m)
      gacc[m] = _mm512_fmadd_ps(_mm512_set1_ps(db[m]), _mm512_cvtepi32_ps(acc[m]), gacc[m]);
  }
  const __m512 s = _mm512_loadu_ps(a.fs);
  const __m512 off = _mm512_set1_ps(128.f);
  for (int m = 0; m < M; ++m)
    _mm512_storeu_ps(a.out + m * kCols, _mm512_mul_ps(s, _mm512_fnmadd_ps(off, _mm512_set1_ps(a.c[m]), gacc[m])));
}

#elif defined(W4A8_AVX2)
constexpr int kMaxRows = 4;

template <int M, int KB>
void block_rows(const Args& a) {
  __m256 facc[M][2], gacc[M][2];
  for (int m = 0; m < M; ++m) facc[m][0] = facc[m][1] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t kb_per_b = KB ? KB : a.ab / kBlockK, ab = kb_per_b * kBlockK, per_g = a.gs / ab;
  const uint8_t* wb = a.wp;
  const int8_t* xb = a.xq;
  const float* db = a.dx;
  for (int64_t g = 0; g < a.G; ++g) {
    for (int m = 0; m < M; ++m) gacc[m][0] = gacc[m][1] = _mm256_setzero_ps();
    for (int64_t bi = 0; bi < per_g; ++bi, xb += a.ld * ab, db += a.ld) {
      __m256i acc[M][2];
      for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
      for (int64_t kb = 0; kb < kb_per_b; ++kb, wb += 64) {
        __builtin_prefetch(wb + kAhead);
        for (int h = 0; h < 2; ++h) {  // columns 8h .. 8h + 7
          const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + h * 32));
          const __m256i lo = _mm256_and_si256(p, mask);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
          for (int m = 0; m < M; ++m) {
            const int8_t* xk = xb + m * ab + kb * kBlockK;
            // pairs of u8 x s8 products fit int16: 2 * 15 * 127, twice
            const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(xk))),
                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(xk + 4))));
            acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(t, ones));
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m256 d = _mm256_set1_ps(db[m]);
        for (int h = 0; h < 2; ++h) gacc[m][h] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(acc[m][h]), gacc[m][h]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.sc + g * kCols + h * 8)));
      const __m256 z = _mm256_cvtepi32_ps(
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.zp + g * kCols + h * 8))));
      for (int m = 0; m < M; ++m) {
        const __m256 t = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.c[g * a.ld + m]), gacc[m][h]);
        facc[m][h] = _mm256_fmadd_ps(s, t, facc[m][h]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(a.out + m * kCols, facc[m][0]);
    _mm256_storeu_ps(a.out + m * kCols + 8, facc[m][1]);
  }
}

// W8: codes back to signed (xor 0x80); |x| x sign(c, x) keeps vpmaddubsw's pairs within int16 (2 * 127 * 127).
template <int M>
void block_rows_w8(const Args& a) {
  __m256 gacc[M][2];
  for (int m = 0; m < M; ++m) gacc[m][0] = gacc[m][1] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t q_per_b = a.ab / 4, B = a.K / a.ab;
  const uint8_t* wb = a.wp;
  const int8_t* xb = a.xq;
  const float* db = a.dx;
  for (int64_t bi = 0; bi < B; ++bi, xb += a.ld * a.ab, db += a.ld) {
    __m256i acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t q = 0; q < q_per_b; ++q, wb += 64) {
      for (int h = 0; h < 2; ++h) {
        const __m256i c = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + h * 32)), flip);
        for (int m = 0; m < M; ++m) {
          const __m256i xv = _mm256_set1_epi32(load4(xb + m * a.ab + q * 4));
          const __m256i t = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(c, xv));
          acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(t, ones));
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      const __m256 d = _mm256_set1_ps(db[m]);
      for (int h = 0; h < 2; ++h) gacc[m][h] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(acc[m][h]), gacc[m][h]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(a.out + m * kCols + h * 8, _mm256_mul_ps(_mm256_loadu_ps(a.fs + h * 8), gacc[m][h]));
}

#else
constexpr int kMaxRows = 4;

template <int M, int KB>
void block_rows(const Args& a) {
  float facc[M][kCols] = {};
  const int64_t kb_per_b = a.ab / kBlockK, per_g = a.gs / a.ab;
  for (int64_t g = 0; g < a.G; ++g) {
    float gacc[M][kCols] = {};
    for (int64_t bi = g * per_g; bi < (g + 1) * per_g; ++bi) {
      int32_t acc[M][kCols] = {};
      for (int64_t kb = 0; kb < kb_per_b; ++kb) {
        const uint8_t* p = a.wp + (bi * kb_per_b + kb) * 64;
        for (int m = 0; m < M; ++m) {
          const int8_t* xk = a.xq + (bi * a.ld + m) * a.ab + kb * kBlockK;
          for (int j = 0; j < 64; ++j) {
            const int col = j / 4, kq = j % 4;
            acc[m][col] += static_cast<int32_t>(p[j] & 15) * xk[kq] + static_cast<int32_t>(p[j] >> 4) * xk[4 + kq];
          }
        }
      }
      for (int m = 0; m < M; ++m)
        for (int col = 0; col < kCols; ++col) gacc[m][col] += a.dx[bi * a.ld + m] * static_cast<float>(acc[m][col]);
    }
    for (int m = 0; m < M; ++m) {
      const float cm = a.c[g * a.ld + m];
      for (int col = 0; col < kCols; ++col) {
        const float s = static_cast<float>(a.sc[g * kCols + col]), z = static_cast<float>(a.zp[g * kCols + col]);
        facc[m][col] += s * (gacc[m][col] - z * cm);
      }
    }
  }
  for (int m = 0; m < M; ++m) std::memcpy(a.out + m * kCols, facc[m], sizeof(facc[m]));
}

template <int M>
void block_rows_w8(const Args& a) {
  float gacc[M][kCols] = {};
  const int64_t q_per_b = a.ab / 4, B = a.K / a.ab;
  for (int64_t bi = 0; bi < B; ++bi) {
    int32_t acc[M][kCols] = {};
    for (int64_t q = 0; q < q_per_b; ++q) {
      const uint8_t* p = a.wp + (bi * q_per_b + q) * 64;
      for (int m = 0; m < M; ++m) {
        const int8_t* xk = a.xq + (bi * a.ld + m) * a.ab + q * 4;
        for (int j = 0; j < 64; ++j) acc[m][j / 4] += static_cast<int32_t>(static_cast<int8_t>(p[j] ^ 0x80)) * xk[j % 4];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int col = 0; col < kCols; ++col) gacc[m][col] += a.dx[bi * a.ld + m] * static_cast<float>(acc[m][col]);
  }
  for (int m = 0; m < M; ++m)
    for (int col = 0; col < kCols; ++col) a.out[m * kCols + col] = a.fs[col] * gacc[m][col];
}
#endif

template <int M>
void rows_for(int bits, const Args& a) {
  if (bits == 8) return block_rows_w8<M>(a);
  if (a.ab == kBlockK) return block_rows<M, 1>(a);
  block_rows<M, 0>(a);
}

void run_rows(int bits, int rows, const Args& a) {
  switch (rows) {
    case 1: return rows_for<1>(bits, a);
    case 2: return rows_for<2>(bits, a);
    case 3: return rows_for<3>(bits, a);
    case 4: return rows_for<4>(bits, a);
#if defined(W4A8_AVX512VNNI)
    case 5: return rows_for<5>(bits, a);
    case 6: return rows_for<6>(bits, a);
    case 7: return rows_for<7>(bits, a);
    case 8: return rows_for<8>(bits, a);
#endif
  }
  TORCH_CHECK(false, "w4a8: unsupported row chunk ", rows);
}

// Runs first(i0, i1) over [0, n1), then, once all of it is done, second(i0, i1) over [0, n2), in static chunks
// per thread. With OpenMP both phases share one team (one fork and a barrier, not two forks).
template <typename F1, typename F2>
void two_phases(int64_t n1, int64_t n2, const F1& first, const F2& second) {
#ifdef _OPENMP
  const int64_t nth = std::min<int64_t>(at::get_num_threads(), std::max(n1, n2));
  if (nth > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(nth)
    {
      const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
      const int64_t c1 = (n1 + n - 1) / n, c2 = (n2 + n - 1) / n;
      if (t * c1 < n1) first(t * c1, std::min(n1, (t + 1) * c1));
#pragma omp barrier
      if (t * c2 < n2) second(t * c2, std::min(n2, (t + 1) * c2));
    }
    return;
  }
#endif
  at::parallel_for(0, n1, 1, first);
  at::parallel_for(0, n2, 1, second);
}

// bits 4: scales (N/16, G, 16) float16 and zeros (N/16, G, 16) uint8; bits 8: scales (N/16, 16) float32, gs = K.
// y (M, N) in the activation dtype T, or float32 (Y = float) for logits.
template <typename T, typename Y>
void matmul(int bits, const T* x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
            int64_t M, int64_t K, int64_t gs, int64_t ab, Y* y) {
  const int64_t G = K / gs, B = K / ab;
  const int64_t blocks = packed.size(0);
  const int64_t N = blocks * kCols;
  auto xq = at::empty({B, M, ab}, at::TensorOptions().dtype(at::kChar));
  auto dxs = at::empty({M * (B + G)}, at::TensorOptions().dtype(at::kFloat));
  float* dx = dxs.data_ptr<float>();
  float* c = dx + M * B;
  int8_t* xqp = xq.data_ptr<int8_t>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* sc = bits == 4 ? scales.data_ptr<c10::Half>() : nullptr;
  const uint8_t* zp = bits == 4 ? zeros.data_ptr<uint8_t>() : nullptr;
  const float* fs = bits == 8 ? scales.data_ptr<float>() : nullptr;
  const int64_t block_bytes = K * bits / 8 * kCols;
  auto quantize = [&](int64_t t0, int64_t t1) { quantize_tasks(x, M, K, gs, ab, xqp, dx, c, t0, t1); };
  auto multiply = [&](int64_t b0, int64_t b1) {
    float tile[kMaxRows * kCols];
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        Args a{wp + b * block_bytes,
               bits == 4 ? sc + b * G * kCols : nullptr,
               bits == 4 ? zp + b * G * kCols : nullptr,
               xqp + m0 * ab,
               dx + m0,
               c + m0,
               K,
               G,
               gs,
               ab,
               M,
               tile,
               bits == 8 ? fs + b * kCols : nullptr};
        run_rows(bits, rows, a);
        for (int r = 0; r < rows; ++r)
          for (int j = 0; j < kCols; ++j) y[(m0 + r) * N + b * kCols + j] = static_cast<Y>(tile[r * kCols + j]);
      }
    }
  };
  two_phases(M * G, blocks, quantize, multiply);
}

at::Tensor w4a8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t group_size, int64_t act_block) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "w4a8_mm: x must be a contiguous (M, K) matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "w4a8_mm: packed must be contiguous (N/16, K/8, 64) uint8");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group_size > 0 && group_size % kBlockK == 0 && K % group_size == 0,
              "w4a8_mm: group_size must be a multiple of 8 dividing K");
  TORCH_CHECK(act_block > 0 && act_block % kBlockK == 0 && group_size % act_block == 0,
              "w4a8_mm: act_block must be a multiple of 8 dividing group_size");
  TORCH_CHECK(packed.size(1) * kBlockK == K, "w4a8_mm: packed has K=", packed.size(1) * kBlockK, ", x has ", K);
  const int64_t G = K / group_size, blocks = packed.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == blocks && scales.size(1) == G && scales.size(2) == kCols,
              "w4a8_mm: scales must be contiguous (N/16, G, 16) float16");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "w4a8_mm: zeros must be contiguous (N/16, G, 16) uint8");
  auto y = at::empty({M, blocks * kCols}, x.options());
  if (M == 0) return y;
  if (x.scalar_type() == at::kBFloat16) {
    matmul(4, x.data_ptr<c10::BFloat16>(), packed, scales, zeros, M, K, group_size, act_block,
           y.data_ptr<c10::BFloat16>());
  } else if (x.scalar_type() == at::kFloat) {
    matmul(4, x.data_ptr<float>(), packed, scales, zeros, M, K, group_size, act_block, y.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "w4a8_mm: x must be bfloat16 or float32, got ", x.scalar_type());
  }
  return y;
}

at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t act_block,
                   bool float_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "w8a8_mm: x must be a contiguous (M, K) matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "w8a8_mm: packed must be contiguous (N/16, K/4, 64) uint8");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) * 4 == K, "w8a8_mm: packed has K=", packed.size(1) * 4, ", x has ", K);
  TORCH_CHECK(act_block > 0 && act_block % 4 == 0 && K % act_block == 0,
              "w8a8_mm: act_block must be a multiple of 4 dividing K");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == blocks && scales.size(1) == kCols,
              "w8a8_mm: scales must be contiguous (N/16, 16) float32");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "w8a8_mm: x must be bfloat16 or float32, got ", x.scalar_type());
  auto y = at::empty({M, blocks * kCols}, float_out ? x.options().dtype(at::kFloat) : x.options());
  if (M == 0) return y;
  if (x.scalar_type() == at::kBFloat16 && !float_out) {
    matmul(8, x.data_ptr<c10::BFloat16>(), packed, scales, scales, M, K, K, act_block, y.data_ptr<c10::BFloat16>());
  } else if (x.scalar_type() == at::kBFloat16) {
    matmul(8, x.data_ptr<c10::BFloat16>(), packed, scales, scales, M, K, K, act_block, y.data_ptr<float>());
  } else {
    matmul(8, x.data_ptr<float>(), packed, scales, scales, M, K, K, act_block, y.data_ptr<float>());
  }
  return y;
}

// Dequantizes the packed int4 weight to a dense (N/16 * 16, K) bfloat16 matrix, w[n, k] = bf16(s * (q - z)): the
// product is exact in float32 (|q - z| <= 15 times a float16 scale), so the one rounding is to bfloat16 (nearest
// even). The dense prefill (models/kernels.py) multiplies it with a bf16 GEMM where that is faster than W4A8.
#if defined(W4A8_AVX512VNNI)
inline __m256i to_bf16(__m512 v) {  // round to nearest even; the weights are finite
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
#endif

void dequant_block(const uint8_t* wp, const c10::Half* sc, const uint8_t* zp, int64_t K, int64_t gs,
                   c10::BFloat16* w) {
  const int64_t kbs_per_g = gs / kBlockK;
  for (int64_t g = 0; g < K / gs; ++g) {
    const c10::Half* s = sc + g * kCols;
    const uint8_t* z = zp + g * kCols;
#if defined(W4A8_AVX512VNNI)
    const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    const __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))));
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 s2[8], z2[8];  // columns c and c + 1 (c = 2i), each repeated over 8 lanes
    for (int i = 0; i < 8; ++i) {
      const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(2 * i), halves);
      s2[i] = _mm512_permutexvar_ps(idx, sv);
      z2[i] = _mm512_permutexvar_ps(idx, zv);
    }
#endif
    for (int64_t kb = g * kbs_per_g; kb < (g + 1) * kbs_per_g; ++kb) {
      const uint8_t* p = wp + kb * 64;
#if defined(W4A8_AVX512VNNI)
      // 128-bit lane l of unpacklo(lo, hi) holds columns 4l and 4l + 1, of unpackhi columns 4l + 2 and 4l + 3, each as
      // its 8 codes in k order (lo's dword: k 0-3, hi's: k 4-7)
      const __m512i v = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x0F);
      const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      const __m512i pairs[2] = {_mm512_unpacklo_epi32(lo, hi), _mm512_unpackhi_epi32(lo, hi)};
      for (int h = 0; h < 2; ++h) {
        for (int l = 0; l < 4; ++l) {
          const int c = 4 * l + 2 * h;
          __m128i codes;
          switch (l) {  // the lane index must be a compile-time constant
            case 0: codes = _mm512_extracti32x4_epi32(pairs[h], 0); break;
            case 1: codes = _mm512_extracti32x4_epi32(pairs[h], 1); break;
            case 2: codes = _mm512_extracti32x4_epi32(pairs[h], 2); break;
            default: codes = _mm512_extracti32x4_epi32(pairs[h], 3); break;
          }
          const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
          const __m256i b = to_bf16(_mm512_mul_ps(_mm512_sub_ps(q, z2[c / 2]), s2[c / 2]));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(w + c * K + kb * kBlockK), _mm256_castsi256_si128(b));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(w + (c + 1) * K + kb * kBlockK), _mm256_extracti128_si256(b, 1));
        }
      }
#else
      for (int j = 0; j < 64; ++j) {
        const int col = j / 4, kq = j % 4;
        const float sf = static_cast<float>(s[col]);
        const int zc = z[col];
        c10::BFloat16* row = w + col * K + kb * kBlockK;
        row[kq] = c10::BFloat16(sf * static_cast<float>((p[j] & 15) - zc));
        row[4 + kq] = c10::BFloat16(sf * static_cast<float>((p[j] >> 4) - zc));
      }
#endif
    }
  }
}

at::Tensor w4a8_dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                        int64_t group_size) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "w4a8_dequant: packed must be contiguous (N/16, K/8, 64) uint8");
  const int64_t blocks = packed.size(0), K = packed.size(1) * kBlockK;
  TORCH_CHECK(group_size > 0 && group_size % kBlockK == 0 && K % group_size == 0,
              "w4a8_dequant: group_size must be a multiple of 8 dividing K");
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == blocks && scales.size(1) == G && scales.size(2) == kCols,
              "w4a8_dequant: scales must be contiguous (N/16, G, 16) float16");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "w4a8_dequant: zeros must be contiguous (N/16, G, 16) uint8");
  auto w = at::empty({blocks * kCols, K}, packed.options().dtype(at::kBFloat16));
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  c10::BFloat16* out = w.data_ptr<c10::BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      dequant_block(wp + b * K * 8, sc + b * G * kCols, zp + b * G * kCols, K, group_size, out + b * kCols * K);
  });
  return w;
}

// W4 x bf16 through AMX tiles (Intel Xeon since Sapphire Rapids), for the batch sizes where W4A8's vpdpbusd chains
// are compute-bound. Activations stay bfloat16 (no int8 rounding); each packed code q becomes the bfloat16 value
// 128 + q (bits 0x4300 | q: exact), so one tdpbf16ps per 32 k sums the exact products x * (128 + q) in float32,
// and per weight group
//   y[m, n] += s[g, n] * (sum_{k in g} x[m, k] * (128 + q[n, k]) - (128 + z[g, n]) * sum_{k in g} x[m, k]).
// B tiles (16 rows of 32 bfloat16: row r holds, for each of 16 columns, k = 2r and 2r + 1) are written from the
// W4A8 layout with in-lane byte shuffles, once per (column block, group) and used for every 16-row chunk of x.

#if defined(W4A8_AMX)
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,amx-int8")))

// The process's permission to use AMX tile data (Linux asks for it once: arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0 and 1: C (rows x 16 float32, alternating by unit); tiles 2/3, 4/5 and 6/7: A (rows x 32 bfloat16) and
// B (16 x 32 bfloat16 in pairs), taken in turn so that a tile load need not wait for the product reading that tile
// (the int8 kernel takes the same shapes: C rows x 16 int32, A rows x 64 int8, B 16 x 16 columns x 4 uint8)
AMX_TARGET void amx_config(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = static_cast<uint8_t>(t >= 2 && t % 2 == 1 ? 16 : rows);
  }
  // not _tile_loadconfig: GCC 12's asm for it declares a read of 8 bytes only, so the compiler may drop the stores
  // above (it did in a variant of this function; then every tile instruction raises SIGILL)
  __asm__ __volatile__("ldtilecfg %0" : : "m"(cfg));
}

// Starts a unit of `rows` rows in C tile `slot`: a new row count reloads the configuration, which clears the
// tiles, so the pending unit is finished first; then zeroes the C tile.
template <typename P, typename F>
AMX_TARGET inline void amx_start(int rows, int slot, int& configured, P& pending, const F& finish) {
  if (rows != configured) {
    if (pending.slot >= 0) finish(pending);
    pending.slot = -1;
    amx_config(rows);
    configured = rows;
  }
  if (slot == 0) {
    _tile_zero(0);
  } else {
    _tile_zero(1);
  }
}

// Stores C tile `slot` (rows x 64 bytes) to c, 64 bytes a row.
AMX_TARGET inline void amx_store(int slot, void* c) {
  if (slot == 0) {
    _tile_stored(0, c, 64);
  } else {
    _tile_stored(1, c, 64);
  }
}

// (GCC's tile intrinsics paste the tile number into the instruction: it must be a literal)
#define AMX_STEP(C, A, B)     \
  _tile_loadd(A, a, lda);     \
  _tile_loadd(B, b, 64);      \
  _tile_dpbf16ps(C, A, B);    \
  return

// C tile `slot` += A (x from a, row stride lda bytes) times B (b), on tile pair `pair` (0..2)
AMX_TARGET inline void amx_mac(int slot, int pair, const c10::BFloat16* a, int64_t lda, const uint16_t* b) {
  switch (slot * 3 + pair) {
    case 0: AMX_STEP(0, 2, 3);
    case 1: AMX_STEP(0, 4, 5);
    case 2: AMX_STEP(0, 6, 7);
    case 3: AMX_STEP(1, 2, 3);
    case 4: AMX_STEP(1, 4, 5);
    default: AMX_STEP(1, 6, 7);
  }
}
#define AMX_STEP8(C, A, B)    \
  _tile_loadd(A, a, 64);      \
  _tile_loadd(B, b, 64);      \
  _tile_dpbsud(C, A, B);      \
  return

// int8: C tile `slot` += A (rows of 64 int8 activations at a, 64 bytes apart) times B (16 rows of 16 columns x 4
// uint8 codes at b), signed x unsigned
AMX_TARGET inline void amx_mac8(int slot, int pair, const int8_t* a, const uint8_t* b) {
  switch (slot * 3 + pair) {
    case 0: AMX_STEP8(0, 2, 3);
    case 1: AMX_STEP8(0, 4, 5);
    case 2: AMX_STEP8(0, 6, 7);
    case 3: AMX_STEP8(1, 2, 3);
    case 4: AMX_STEP8(1, 4, 5);
    default: AMX_STEP8(1, 6, 7);
  }
}
#undef AMX_STEP
#undef AMX_STEP8

constexpr int64_t kAmxAhead = 4096;  // kAhead for the AMX kernel (eight units of groups of 64)

// Writes the B tiles of k [0, 8 * nkb) of one column block's packed rows wp ((nkb, 64) uint8) to bt: 4 tile rows of
// 64 bytes per packed row.
inline void unpack_b(const uint8_t* wp, int64_t nkb, uint16_t* bt) {
  // in-lane shuffles: word w of a 128-bit lane (4 columns x 2 k) takes byte 4 * (w / 2) + w % 2 (k 0, 1) or that
  // + 2 (k 2, 3), the high byte zeroed (index 0x80)
  const __m512i idx01 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -128, 1, -128, 4, -128, 5, -128, 8, -128, 9, -128,
                                                             12, -128, 13, -128));
  const __m512i idx23 = _mm512_broadcast_i32x4(_mm_setr_epi8(2, -128, 3, -128, 6, -128, 7, -128, 10, -128, 11, -128,
                                                             14, -128, 15, -128));
  const __m512i low = _mm512_set1_epi16(0x000F), base = _mm512_set1_epi16(0x4300);
  for (int64_t kb = 0; kb < nkb; ++kb) {
    __builtin_prefetch(wp + kb * 64 + kAmxAhead);
    const __m512i v = _mm512_loadu_si512(wp + kb * 64);
    const __m512i w01 = _mm512_shuffle_epi8(v, idx01), w23 = _mm512_shuffle_epi8(v, idx23);
    __m512i* out = reinterpret_cast<__m512i*>(bt + kb * 4 * 32);
    _mm512_store_si512(out + 0, _mm512_ternarylogic_epi32(w01, low, base, 0xEA));  // (a & b) | c: k 0, 1
    _mm512_store_si512(out + 1, _mm512_ternarylogic_epi32(w23, low, base, 0xEA));  // k 2, 3
    _mm512_store_si512(out + 2, _mm512_or_si512(_mm512_srli_epi16(w01, 4), base));  // high nibbles: k 4, 5
    _mm512_store_si512(out + 3, _mm512_or_si512(_mm512_srli_epi16(w23, 4), base));  // k 6, 7
  }
}

// Column blocks [b0, b1) of y (M, N) bfloat16 = x (M, K) bfloat16 times the packed weight; sx (G, M) float32 holds
// each row's sum over each weight group. Software-pipelined over the thread's (block, group) units: the B tiles of
// the next unit are written while the tiles multiply this one (a tile load waits for the stores it reads to
// drain), and each unit's C tile is stored and read back one step later, after the next unit's products are
// issued (a tile store stalls until its tile is ready).
// R > 0: M == R <= 16 rows, one chunk, the accumulators in registers; R == 0: any M, chunks of 16 rows sharing
// each unit's B tiles, the accumulators in memory.
template <int R>
AMX_TARGET void amx_blocks(const c10::BFloat16* x, const uint8_t* wp, const c10::Half* sc, const uint8_t* zp,
                           const float* sx, int64_t M, int64_t K, int64_t gs, int64_t N, int64_t b0, int64_t b1,
                           c10::BFloat16* y) {
  const int64_t G = K / gs, kbs_per_g = gs / kBlockK, tiles_per_g = gs / 32;
  const int64_t U = (b1 - b0) * G;
  alignas(64) uint16_t bt[2][16 * 32 * 8];  // B tiles of two units (groups of up to 256)
  alignas(64) float ct[16 * 16];
  __m512 racc[R > 0 ? R : 1];
  std::vector<float> accs(R > 0 ? 0 : M * kCols);
  float* acc = accs.data();
  int configured = 0;
  struct Pending {
    int64_t b, g, m0;
    int rows, slot;
  } pending{0, 0, 0, 0, -1};
  // stores one unit's C tile, acc rows [m0, m0 + rows) += s * (C - (128 + z) * sx), and after the block's last
  // group writes its output rows
  auto finish = [&](const Pending& p) {
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + (p.b * G + p.g) * kCols)));
    const __m512 zz = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + (p.b * G + p.g) * kCols)))),
                                    _mm512_set1_ps(128.f));
    amx_store(p.slot, ct);
    const float* c = ct;
    const int rows = R > 0 ? R : p.rows;
    for (int r = 0; r < rows; ++r) {
      const int64_t m = p.m0 + r;
      const __m512 t = _mm512_fnmadd_ps(zz, _mm512_set1_ps(sx[p.g * M + m]), _mm512_load_ps(c + r * kCols));
      float* a = acc + m * kCols;
      __m512 v;
      if constexpr (R > 0) {
        v = p.g == 0 ? _mm512_mul_ps(s, t) : _mm512_fmadd_ps(s, t, racc[r]);
        racc[r] = v;
      } else {
        v = p.g == 0 ? _mm512_mul_ps(s, t) : _mm512_fmadd_ps(s, t, _mm512_loadu_ps(a));
        if (p.g != G - 1) _mm512_storeu_ps(a, v);
      }
      if (p.g == G - 1) _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + p.b * kCols), to_bf16(v));
    }
  };
  if (U > 0) unpack_b(wp + b0 * K * 8, kbs_per_g, bt[0]);
  int step = 0, pair = 0;
  for (int64_t u = 0; u < U; ++u) {
    const int64_t b = b0 + u / G, g = u % G;
    if (u + 1 < U) {
      const int64_t bn = b0 + (u + 1) / G, gn = (u + 1) % G;
      unpack_b(wp + bn * K * 8 + gn * kbs_per_g * 64, kbs_per_g, bt[(u + 1) & 1]);
    }
    const uint16_t* bu = bt[u & 1];
    for (int64_t m0 = 0; m0 < M; m0 += 16, ++step) {
      const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
      const int slot = step & 1;
      amx_start(rows, slot, configured, pending, finish);
      for (int64_t t = 0; t < tiles_per_g; ++t, pair = pair == 2 ? 0 : pair + 1)
        amx_mac(slot, pair, x + m0 * K + g * gs + t * 32, K * 2, bu + t * 16 * 32);
      // the previous unit's C, whose products have had this unit's issue time to finish: a tile store stalls
      // until its tile is ready
      if (pending.slot >= 0) finish(pending);
      pending = Pending{b, g, m0, rows, slot};
    }
  }
  if (pending.slot >= 0) finish(pending);
  if (configured) _tile_release();
}
#endif

const char* isa();

#if defined(W4A8_AMX)
// W8A8 through AMX-INT8 tiles (the int8 head, `w8a8_mm`'s activation blocks of 64 only): the packed layout
// (N/16, K/4, 64) is already the B tile layout (16 columns x 4 k a row), so each 1 KB B tile is loaded straight
// from the weight, and one tdpbsud per (16 columns, activation block) gives the exact int32 dot of the block.
// The float terms are summed in the order block_rows_w8 sums them, so the results are the same bit for bit.
template <typename Y>
AMX_TARGET void amx8_blocks(const int8_t* xq, const float* dx, const float* c, const uint8_t* wp, const float* fs,
                            int64_t M, int64_t K, int64_t N, int64_t b0, int64_t b1, Y* y) {
  constexpr int64_t kAb = 64;
  const int64_t B = K / kAb, U = (b1 - b0) * B;
  alignas(64) int32_t ct[16 * 16];
  std::vector<float> accs(M * kCols);
  float* acc = accs.data();
  int configured = 0, step = 0, pair = 0;
  struct Pending {
    int64_t b, kb, m0;
    int rows, slot;
  } pending{0, 0, 0, 0, -1};
  auto finish = [&](const Pending& p) {
    amx_store(p.slot, ct);
    const __m512 s = _mm512_loadu_ps(fs + p.b * kCols), off = _mm512_set1_ps(128.f);
    for (int r = 0; r < p.rows; ++r) {
      const int64_t m = p.m0 + r;
      float* a = acc + m * kCols;
      const __m512 prev = p.kb == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(a);
      const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(dx[p.kb * M + m]),
                                       _mm512_cvtepi32_ps(_mm512_load_si512(ct + r * kCols)), prev);
      if (p.kb == B - 1) {
        const __m512 o = _mm512_mul_ps(s, _mm512_fnmadd_ps(off, _mm512_set1_ps(c[m]), v));
        alignas(64) float tmp[kCols];
        _mm512_store_ps(tmp, o);
        for (int j = 0; j < kCols; ++j) y[m * N + p.b * kCols + j] = static_cast<Y>(tmp[j]);
      } else {
        _mm512_storeu_ps(a, v);
      }
    }
  };
  for (int64_t u = 0; u < U; ++u) {
    const int64_t b = b0 + u / B, kb = u % B;
    const uint8_t* bu = wp + (b * B + kb) * 16 * 64;
    for (int l = 0; l < 16; ++l) __builtin_prefetch(bu + kAhead + l * 64);
    for (int64_t m0 = 0; m0 < M; m0 += 16, ++step) {
      const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
      const int slot = step & 1;
      amx_start(rows, slot, configured, pending, finish);
      amx_mac8(slot, pair, xq + (kb * M + m0) * kAb, bu);
      pair = pair == 2 ? 0 : pair + 1;
      if (pending.slot >= 0) finish(pending);
      pending = Pending{b, kb, m0, rows, slot};
    }
  }
  if (pending.slot >= 0) finish(pending);
  if (configured) _tile_release();
}

template <typename T, typename Y>
void amx8_matmul(const T* x, const at::Tensor& packed, const at::Tensor& scales, int64_t M, int64_t K, Y* y) {
  constexpr int64_t kAb = 64;
  const int64_t B = K / kAb, blocks = packed.size(0), N = blocks * kCols;
  auto xq = at::empty({B, M, kAb}, at::TensorOptions().dtype(at::kChar));
  auto dxs = at::empty({M * (B + 1)}, at::TensorOptions().dtype(at::kFloat));
  float* dx = dxs.data_ptr<float>();
  float* c = dx + M * B;
  int8_t* xqp = xq.data_ptr<int8_t>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* fs = scales.data_ptr<float>();
  auto quantize = [&](int64_t t0, int64_t t1) { quantize_tasks(x, M, K, K, kAb, xqp, dx, c, t0, t1); };
  auto multiply = [&](int64_t b0, int64_t b1) { amx8_blocks(xqp, dx, c, wp, fs, M, K, N, b0, b1, y); };
  two_phases(M, blocks, quantize, multiply);
}
#endif

at::Tensor w8_amx_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t act_block,
                     bool float_out) {
#if defined(W4A8_AMX)
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "w8_amx_mm: x must be a contiguous (M, K) matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "w8_amx_mm: packed must be contiguous (N/16, K/4, 64) uint8");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) * 4 == K, "w8_amx_mm: packed has K=", packed.size(1) * 4, ", x has ", K);
  TORCH_CHECK(act_block == 64 && K % 64 == 0, "w8_amx_mm: act_block must be 64, dividing K");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == blocks && scales.size(1) == kCols,
              "w8_amx_mm: scales must be contiguous (N/16, 16) float32");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "w8_amx_mm: x must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(amx_permitted(), "w8_amx_mm: the OS did not grant AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)");
  auto y = at::empty({M, blocks * kCols}, float_out ? x.options().dtype(at::kFloat) : x.options());
  if (M == 0) return y;
  if (x.scalar_type() == at::kBFloat16 && !float_out) {
    amx8_matmul(x.data_ptr<c10::BFloat16>(), packed, scales, M, K, y.data_ptr<c10::BFloat16>());
  } else if (x.scalar_type() == at::kBFloat16) {
    amx8_matmul(x.data_ptr<c10::BFloat16>(), packed, scales, M, K, y.data_ptr<float>());
  } else {  // float32 in: float32 out either way
    amx8_matmul(x.data_ptr<float>(), packed, scales, M, K, y.data_ptr<float>());
  }
  return y;
#else
  TORCH_CHECK(false, "w8_amx_mm: this build (", isa(), ") has no AMX path");
#endif
}

at::Tensor w4_amx_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t group_size) {
#if defined(W4A8_AMX)
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "w4_amx_mm: x must be a contiguous (M, K) bfloat16 matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "w4_amx_mm: packed must be contiguous (N/16, K/8, 64) uint8");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.size(1) * kBlockK == K, "w4_amx_mm: packed has K=", packed.size(1) * kBlockK, ", x has ", K);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && group_size <= 256 && K % group_size == 0,
              "w4_amx_mm: group_size must be 32, 64, 128 or 256 dividing K");
  const int64_t G = K / group_size, blocks = packed.size(0), N = blocks * kCols;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == blocks && scales.size(1) == G && scales.size(2) == kCols,
              "w4_amx_mm: scales must be contiguous (N/16, G, 16) float16");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "w4_amx_mm: zeros must be contiguous (N/16, G, 16) uint8");
  TORCH_CHECK(amx_permitted(), "w4_amx_mm: the OS did not grant AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)");
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  auto sxs = at::empty({G, M}, x.options().dtype(at::kFloat));
  float* sx = sxs.data_ptr<float>();
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  auto sums = [&](int64_t t0, int64_t t1) {  // task i = (group i / M, row i % M)
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t g = i / M, m = i % M;
      const c10::BFloat16* xr = xp + m * K + g * group_size;
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < group_size; k += 16) a = _mm512_add_ps(a, load16(xr + k));
      sx[g * M + m] = _mm512_reduce_add_ps(a);
    }
  };
  auto multiply = [&](int64_t b0, int64_t b1) {
    switch (M) {
#define AMX_ROWS(R) \
  case R: return amx_blocks<R>(xp, wp, sc, zp, sx, M, K, group_size, N, b0, b1, yp);
      AMX_ROWS(1) AMX_ROWS(2) AMX_ROWS(3) AMX_ROWS(4) AMX_ROWS(5) AMX_ROWS(6) AMX_ROWS(7) AMX_ROWS(8)
      AMX_ROWS(9) AMX_ROWS(10) AMX_ROWS(11) AMX_ROWS(12) AMX_ROWS(13) AMX_ROWS(14) AMX_ROWS(15) AMX_ROWS(16)
#undef AMX_ROWS
      default: return amx_blocks<0>(xp, wp, sc, zp, sx, M, K, group_size, N, b0, b1, yp);
    }
  };
  two_phases(M * G, blocks, sums, multiply);
  return y;
#else
  TORCH_CHECK(false, "w4_amx_mm: this build (", isa(), ") has no AMX path");
#endif
}

// the AMX path is compiled in and the OS grants this process tile data (false on CPUs without AMX)
bool has_amx_op() {
#if defined(W4A8_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

const char* isa() {
#if defined(W4A8_AVX512VNNI)
  return "avx512_vnni";
#elif defined(W4A8_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

std::string isa_op() { return isa(); }

}  // namespace

TORCH_LIBRARY(JETSERVE_W4A8_NS, m) {
  m.def("w4a8_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, int act_block) -> Tensor");
  m.def("w8a8_mm(Tensor x, Tensor packed, Tensor scales, int act_block, bool float_out=False) -> Tensor");
  m.def("w4a8_dequant(Tensor packed, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("w4_amx_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("w8_amx_mm(Tensor x, Tensor packed, Tensor scales, int act_block, bool float_out=False) -> Tensor");
  m.def("has_amx() -> bool", [] { return has_amx_op(); });
  m.def("isa() -> str", [] { return isa_op(); });
}

TORCH_LIBRARY_IMPL(JETSERVE_W4A8_NS, CPU, m) {
  m.impl("w4a8_mm", &w4a8_mm);
  m.impl("w8a8_mm", &w8a8_mm);
  m.impl("w4a8_dequant", &w4a8_dequant);
  m.impl("w4_amx_mm", &w4_amx_mm);
  m.impl("w8_amx_mm", &w8_amx_mm);
}
