// Decode attention on CPU that reads each sequence's keys and values in place in the static KV cache.
//
// out[b, h] = sum_{t <= positions[b]} softmax_t(scale * q[b, h] . K[slots[b], t, h / g]) V[slots[b], t, h / g]
// for q (B, H, D) and the cache's per-layer K and V (S, T, KVH, D), g = H / KVH query heads per KV head (GQA).
// Row b attends over exactly positions[b] + 1 keys: no gathered copy of the cache, no mask, no padding to a
// length bucket. Work is split over (row, KV head, chunk of keys) so that batch 1 also keeps every thread busy
// (flash-decoding): each chunk keeps its running max, sum of exponentials and weighted sum of values in float32,
// and a second pass merges the chunks. models/attention.py holds the plain-PyTorch reference.
// An int8 cache (models/kv_cache.py) holds rows of D codes and their float32 scale: a key's scale multiplies its
// scores and a value's scale its softmax weight, so the codes are only converted, never rescaled one by one.
//
// q . k takes 4 keys at a time and the softmax 16 (AVX-512) or 8 (AVX2) scores at a time with intrinsics
// (`scores4`, `softmax_part`; exp is a polynomial); the value loop is written for the compiler's vectorizer
// (`omp simd`). The cache may have any strides whose head_dim is contiguous. Built into the same extension as
// w4a8.cpp (models/w4a8.py `load`), under the same op namespace.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef JETSERVE_W4A8_NS
#define JETSERVE_W4A8_NS jetserve_w4a8
#endif

namespace {

constexpr int64_t kMinChunk = 32;  // keys per task at least, when batch 1 splits a row's keys over the threads
// bounds of the stack buffers, mirrored by models/attention.py (MAX_HEAD_DIM, MAX_GROUP)
constexpr int64_t kMaxHead = 256;  // head_dim
constexpr int64_t kMaxGroup = 16;  // query heads per KV head
constexpr int64_t kAhead = 16;  // keys prefetched ahead (each row's K and V are KVH * D apart: strided reads)

using jetserve::exp2_neg;

// an int8 cache row is D codes and then its float32 scale (models/kv_cache.py): the row's scale, else 1
template <typename T>
inline float row_scale(const T* row, int64_t D) {
  if constexpr (std::is_same_v<T, int8_t>) {
    float s;
    std::memcpy(&s, row + D, sizeof(float));
    return s;
  } else {
    return 1.f;
  }
}

// elements of a cache row: D, and the scale's 4 bytes of an int8 row
template <typename T>
constexpr int64_t row_len(int64_t D) {
  return std::is_same_v<T, int8_t> ? D + 4 : D;
}

// DC: the head_dim when known at compile time (the common sizes, so loops unroll), else 0 and D at run time
template <typename T, int64_t DC>
inline void load_row(const T* src, float* dst, int64_t D) {
  const int64_t n = DC ? DC : D;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

// the cache lines of one row of D elements, kAhead keys before it is read
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < static_cast<int64_t>(D * sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

struct Shape {
  int64_t B, H, KVH, D, g, T;
  int64_t sQ;      // q's row stride (elements); its heads are D apart
  int64_t sS, sT, sH;  // cache strides of a slot, a position and a KV head (elements); d is 1 apart
};

#if defined(__AVX512F__) || defined(__AVX2__)
using namespace jetserve::vec;
#if defined(__AVX512F__)
inline __m128 reduce4(VecF a, VecF b, VecF c, VecF d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a02 b02 a13 b13
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);  // pairs moved as 64-bit units
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  // each 128-bit lane now holds (a, b, c, d) partial sums: add the four lanes
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#else
inline __m128 reduce4(VecF a, VecF b, VecF c, VecF d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // per 128-bit half: a b c d
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

// q . k for 4 keys at a time: each (key, head) dot product is a vector of partial sums, and the 4 keys' vectors
// are reduced together (a transpose-and-add) instead of one horizontal sum each; the same keys' value rows (v)
// are prefetched for the value loop. Returns the keys done (a multiple of 4); the caller finishes the rest.
template <typename T, int64_t DC, int64_t GC>
int64_t scores4(const Shape& s, const float* qf, const T* k, const T* v, int64_t n, float* scores) {
  const int64_t g = GC ? GC : s.g;
  constexpr int64_t C = DC / kLanes;
  float rows[4][DC];
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    alignas(16) float rs[4];
    for (int r = 0; r < 4; ++r) {
      if (t + r + kAhead < n) prefetch_row(k + (t + r + kAhead) * s.sT, row_len<T>(DC));
      prefetch_row(v + (t + r) * s.sT, row_len<T>(DC));  // for the value loop, after the scores
      load_row<T, DC>(k + (t + r) * s.sT, rows[r], DC);
      rs[r] = row_scale(k + (t + r) * s.sT, DC);
    }
    const __m128 scale4 = _mm_load_ps(rs);
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = qf + j * DC;
      VecF acc[4] = {vzero(), vzero(), vzero(), vzero()};
      for (int64_t c = 0; c < C; ++c) {
        const VecF qv = vload(qj + c * kLanes);
        for (int r = 0; r < 4; ++r) acc[r] = vfma(qv, vload(rows[r] + c * kLanes), acc[r]);
      }
      __m128 dots = reduce4(acc[0], acc[1], acc[2], acc[3]);
      if constexpr (std::is_same_v<T, int8_t>) dots = _mm_mul_ps(dots, scale4);
      _mm_storeu_ps(scores + j * n + t, dots);
    }
  }
  return t;
}
#endif

// scores s[0, n) -> 2^(s - m) in place; ml = (m, sum of them), m = max s.
inline void softmax_part(float* sj, int64_t n, float* ml) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  if (n >= kLanes) {
    VecF mv = vload(sj);
    for (t = kLanes; t + kLanes <= n; t += kLanes) mv = vmax(mv, vload(sj + t));
    m = hmax(mv);
  }
#endif
  for (; t < n; ++t) m = std::max(m, sj[t]);
  float l = 0.f;
  t = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const VecF mv = vset1(m);
  VecF lv = vzero();
  for (; t + kLanes <= n; t += kLanes) {
    const VecF e = vexp2_neg(vsub(vload(sj + t), mv));
    vstore(sj + t, e);
    lv = vadd(lv, e);
  }
  l = hsum(lv);
#endif
  for (; t < n; ++t) {
    sj[t] = exp2_neg(sj[t] - m);
    l += sj[t];
  }
  ml[0] = m;
  ml[1] = l;
}

#if defined(__AVX512F__)
// bfloat16 rows without a float copy: a 64-byte load of 32 values gives, as float vectors, its even elements
// (shift left 16) and its odd ones (mask the high halves). q is permuted to the same order once per task, so
// q . k is unchanged; the value sums are kept in that order and put back in place at the end.
template <int64_t DC>
inline void split_row(const c10::BFloat16* r, __m512* v) {
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t i = 0; i < DC / 32; ++i) {
    const __m512i x = _mm512_loadu_si512(r + 32 * i);
    v[2 * i] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    v[2 * i + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, high));
  }
}

// Row formats of the AVX-512 chunk: how a cache row becomes DC / 16 float vectors, and its scale.
// bfloat16 rows are split into even and odd elements (split_row), so q and the value sums are permuted to match;
// int8 rows (DC codes and a float32 scale, models/kv_cache.py) are converted in order, and the scale multiplies
// a key's scores and a value's weight.
struct Bf16Rows {
  using T = c10::BFloat16;
  static constexpr bool kSplit = true, kScaled = false;
  static constexpr int64_t kExtra = 0;  // bytes after a row's values
  template <int64_t DC>
  static float load(const T* row, __m512* v) {
    split_row<DC>(row, v);
    return 1.f;
  }
};

struct I8Rows {
  using T = int8_t;
  static constexpr bool kSplit = false, kScaled = true;
  static constexpr int64_t kExtra = 4;
  template <int64_t DC>
  static float load(const T* row, __m512* v) {
    for (int64_t i = 0; i < DC / 16; ++i)
      v[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * i))));
    return row_scale(row, DC);
  }
};

// chunk() for a row format R (bfloat16: DC a multiple of 32; int8: of 16), head_dim DC and group GC known at
// compile time
template <typename R, int64_t DC, int64_t GC>
void chunk_vec(const Shape& s, const float* qf, const typename R::T* kbase, const typename R::T* vbase, int64_t t0,
               int64_t t1, float* part, float* scores) {
  using T = typename R::T;
  constexpr int64_t V = DC / 16;  // float vectors a row
  const int64_t n = t1 - t0;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 qs[GC][V];
  for (int64_t j = 0; j < GC; ++j) {
    if constexpr (R::kSplit) {
      for (int64_t i = 0; i < DC / 32; ++i) {
        const __m512 a = _mm512_loadu_ps(qf + j * DC + 32 * i), b = _mm512_loadu_ps(qf + j * DC + 32 * i + 16);
        qs[j][2 * i] = _mm512_permutex2var_ps(a, even, b);
        qs[j][2 * i + 1] = _mm512_permutex2var_ps(a, odd, b);
      }
    } else {
      for (int64_t v = 0; v < V; ++v) qs[j][v] = _mm512_loadu_ps(qf + j * DC + 16 * v);
    }
  }
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    __m512 k[4][V];
    alignas(16) float ks[4];
    for (int r = 0; r < 4; ++r) {
      const T* row = kbase + (t0 + t + r) * s.sT;
      if (t + r + kAhead < n) prefetch_row(row + kAhead * s.sT, DC + R::kExtra);
      prefetch_row(vbase + (t0 + t + r) * s.sT, DC + R::kExtra);  // for the value loop, after the scores
      ks[r] = R::template load<DC>(row, k[r]);
    }
    for (int64_t j = 0; j < GC; ++j) {
      __m512 acc[4];
      for (int r = 0; r < 4; ++r) {
        acc[r] = _mm512_mul_ps(qs[j][0], k[r][0]);
        for (int64_t v = 1; v < V; ++v) acc[r] = _mm512_fmadd_ps(qs[j][v], k[r][v], acc[r]);
      }
      __m128 dots = reduce4(acc[0], acc[1], acc[2], acc[3]);
      if constexpr (R::kScaled) dots = _mm_mul_ps(_mm_load_ps(ks), dots);
      _mm_storeu_ps(scores + j * n + t, dots);
    }
  }
  for (; t < n; ++t) {
    __m512 k[V];
    const float ks = R::template load<DC>(kbase + (t0 + t) * s.sT, k);
    for (int64_t j = 0; j < GC; ++j) {
      __m512 acc = _mm512_mul_ps(qs[j][0], k[0]);
      for (int64_t v = 1; v < V; ++v) acc = _mm512_fmadd_ps(qs[j][v], k[v], acc);
      scores[j * n + t] = R::kScaled ? _mm512_reduce_add_ps(acc) * ks : _mm512_reduce_add_ps(acc);
    }
  }
  float ml[2 * GC];
  for (int64_t j = 0; j < GC; ++j) softmax_part(scores + j * n, n, ml + 2 * j);
  __m512 acc[GC][V];
  for (int64_t j = 0; j < GC; ++j)
    for (int64_t v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const T* row = vbase + (t0 + t) * s.sT;
    if (t + kAhead < n) prefetch_row(row + kAhead * s.sT, DC + R::kExtra);
    __m512 vr[V];
    const float vs = R::template load<DC>(row, vr);
    for (int64_t j = 0; j < GC; ++j) {
      const __m512 p = _mm512_set1_ps(R::kScaled ? scores[j * n + t] * vs : scores[j * n + t]);
      for (int64_t v = 0; v < V; ++v) acc[j][v] = _mm512_fmadd_ps(p, vr[v], acc[j][v]);
    }
  }
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t j = 0; j < GC; ++j) {
    float* pj = part + j * (DC + 2);
    pj[0] = ml[2 * j];
    pj[1] = ml[2 * j + 1];
    if constexpr (R::kSplit) {
      for (int64_t i = 0; i < DC / 32; ++i) {
        _mm512_storeu_ps(pj + 2 + 32 * i, _mm512_permutex2var_ps(acc[j][2 * i], lo, acc[j][2 * i + 1]));
        _mm512_storeu_ps(pj + 2 + 32 * i + 16, _mm512_permutex2var_ps(acc[j][2 * i], hi, acc[j][2 * i + 1]));
      }
    } else {
      for (int64_t v = 0; v < V; ++v) _mm512_storeu_ps(pj + 2 + 16 * v, acc[j][v]);
    }
  }
}
#endif

// One task: row b, KV head kh, keys [t0, t1) -> per query head j of the group: running max m, sum l (of
// 2^(s - m)) and acc[D] (sum of 2^(s - m) v), written to part[j * (D + 2) ...] as (m, l, acc).
// DC and GC: head_dim and group size when known at compile time (then the loops unroll and the group's
// accumulators stay in registers), else 0 and taken from `s`.
template <typename T, int64_t DC, int64_t GC>
void chunk(const Shape& s, const float* qf, const T* kbase, const T* vbase, int64_t t0, int64_t t1, float* part,
           float* scores) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && DC % 32 == 0 && DC > 0 && GC > 0) {
    return chunk_vec<Bf16Rows, DC, GC>(s, qf, kbase, vbase, t0, t1, part, scores);
  }
  if constexpr (std::is_same_v<T, int8_t> && DC % 16 == 0 && DC > 0 && GC > 0) {
    return chunk_vec<I8Rows, DC, GC>(s, qf, kbase, vbase, t0, t1, part, scores);
  }
#endif
  const int64_t D = DC ? DC : s.D, g = GC ? GC : s.g, n = t1 - t0;
  float row[kMaxHead];
  int64_t t = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (DC > 0 && DC % kLanes == 0)
    t = scores4<T, DC, GC>(s, qf, kbase + t0 * s.sT, vbase + t0 * s.sT, n, scores);
#endif
  for (; t < n; ++t) {
    load_row<T, DC>(kbase + (t0 + t) * s.sT, row, D);
    const float rs = row_scale(kbase + (t0 + t) * s.sT, D);
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = qf + j * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qj[d] * row[d];
      scores[j * n + t] = dot * rs;
    }
  }
  float ml[2 * kMaxGroup];
  for (int64_t j = 0; j < g; ++j) softmax_part(scores + j * n, n, ml + 2 * j);
  float acc[(GC ? GC : kMaxGroup) * (DC ? DC : kMaxHead)];
  std::fill(acc, acc + g * D, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    if (t + kAhead < n) prefetch_row(vbase + (t0 + t + kAhead) * s.sT, row_len<T>(D));
    load_row<T, DC>(vbase + (t0 + t) * s.sT, row, D);
    const float rs = row_scale(vbase + (t0 + t) * s.sT, D);
    for (int64_t j = 0; j < g; ++j) {
      const float p = scores[j * n + t] * rs;
      float* aj = acc + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) aj[d] += p * row[d];
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* pj = part + j * (D + 2);
    pj[0] = ml[2 * j];
    pj[1] = ml[2 * j + 1];
    std::copy(acc + j * D, acc + (j + 1) * D, pj + 2);
  }
}

template <typename T, int64_t DC>
void chunk_g(const Shape& s, const float* qf, const T* kb, const T* vb, int64_t t0, int64_t t1, float* part,
             float* scores) {
  switch (s.g) {
    case 1: return chunk<T, DC, 1>(s, qf, kb, vb, t0, t1, part, scores);
    case 2: return chunk<T, DC, 2>(s, qf, kb, vb, t0, t1, part, scores);
    case 3: return chunk<T, DC, 3>(s, qf, kb, vb, t0, t1, part, scores);
    case 4: return chunk<T, DC, 4>(s, qf, kb, vb, t0, t1, part, scores);
    case 5: return chunk<T, DC, 5>(s, qf, kb, vb, t0, t1, part, scores);
    case 6: return chunk<T, DC, 6>(s, qf, kb, vb, t0, t1, part, scores);
    case 7: return chunk<T, DC, 7>(s, qf, kb, vb, t0, t1, part, scores);
    case 8: return chunk<T, DC, 8>(s, qf, kb, vb, t0, t1, part, scores);
    default: return chunk<T, DC, 0>(s, qf, kb, vb, t0, t1, part, scores);
  }
}

// T: q's and the output's element type; C: the cache's (T, or int8 rows)
template <typename T, typename C>
void attend(const Shape& s, const T* q, const C* kc, const C* vc, const int64_t* slots, const int64_t* positions,
            double scale, T* out) {
  const int64_t B = s.B, KVH = s.KVH, D = s.D, g = s.g;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, positions[b] + 1);
  // chunks per (row, KV head): enough tasks for every thread, none shorter than kMinChunk keys
  const int64_t threads = at::get_num_threads();
  const int64_t want = (2 * threads + B * KVH - 1) / (B * KVH);
  const int64_t splits = std::max<int64_t>(1, std::min(want, (longest + kMinChunk - 1) / kMinChunk));
  const int64_t clen = (longest + splits - 1) / splits;
  const int64_t part_size = g * (D + 2);
  std::vector<float> parts(B * KVH * splits * part_size);
  const float qscale = static_cast<float>(scale * 1.4426950408889634);  // log2(e): softmax in base 2
  at::parallel_for(0, B * KVH * splits, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(g * clen);
    float qf[kMaxGroup * kMaxHead];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (KVH * splits), kh = (i / splits) % KVH, c = i % splits;
      const int64_t len = positions[b] + 1;
      const int64_t t0 = c * clen, t1 = std::min(len, t0 + clen);
      float* part = parts.data() + i * part_size;
      if (t0 >= t1) {  // this row is shorter than the chunk's start: an empty partial
        for (int64_t j = 0; j < g; ++j) {
          part[j * (D + 2)] = -std::numeric_limits<float>::infinity();
          part[j * (D + 2) + 1] = 0.f;
        }
        continue;
      }
      for (int64_t j = 0; j < g; ++j) {
        const T* qj = q + b * s.sQ + (kh * g + j) * D;
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = static_cast<float>(qj[d]) * qscale;
      }
      const int64_t off = slots[b] * s.sS + kh * s.sH;
      switch (D) {
        case 64: chunk_g<C, 64>(s, qf, kc + off, vc + off, t0, t1, part, scores.data()); break;
        case 128: chunk_g<C, 128>(s, qf, kc + off, vc + off, t0, t1, part, scores.data()); break;
        default: chunk<C, 0, 0>(s, qf, kc + off, vc + off, t0, t1, part, scores.data());
      }
    }
  });
  // merge the chunks of each (row, query head)
  at::parallel_for(0, B * KVH * g, 16, [&](int64_t i0, int64_t i1) {
    float acc[kMaxHead];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bk = i / g, j = i % g;  // bk = b * KVH + kh
      const float* first = parts.data() + bk * splits * part_size + j * (D + 2);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < splits; ++c) m = std::max(m, first[c * part_size]);
      float l = 0.f;
      std::fill(acc, acc + D, 0.f);
      for (int64_t c = 0; c < splits; ++c) {
        const float* p = first + c * part_size;
        if (p[1] == 0.f) continue;
        const float w = exp2_neg(p[0] - m);
        l += w * p[1];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * p[2 + d];
      }
      const float inv = 1.f / l;
      T* o = out + i * D;  // (b, kh * g + j) is row-major index b * H + kh * g + j = i
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& slots,
                            const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "decode_attention: q must be (B, H, D) with each row's heads contiguous");
  TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.strides() == vc.strides(),
              "decode_attention: k and v caches must be (S, T, KVH, D) tensors of one shape and layout");
  const bool q8 = kc.scalar_type() == at::kChar;  // int8 rows: D codes and a float32 scale
  TORCH_CHECK(vc.scalar_type() == kc.scalar_type() && (q8 || kc.scalar_type() == q.scalar_type()),
              "decode_attention: the caches must have q's dtype, or both be int8");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = kc.size(0), T = kc.size(1), KVH = kc.size(2);
  TORCH_CHECK(kc.size(3) == (q8 ? D + 4 : D), "decode_attention: head_dim of q (", D, ") and the cache rows (",
              kc.size(3), ") differ", q8 ? " (an int8 cache row is head_dim + 4 bytes)" : "");
  TORCH_CHECK(kc.stride(3) == 1, "decode_attention: each cache row (head_dim) must be contiguous");
  TORCH_CHECK(KVH > 0 && H % KVH == 0 && H / KVH <= kMaxGroup && D <= kMaxHead,
              "decode_attention: needs H % KVH == 0, H / KVH <= ", kMaxGroup, " and head_dim <= ", kMaxHead);
  TORCH_CHECK(slots.dim() == 1 && positions.dim() == 1 && slots.size(0) == B && positions.size(0) == B &&
                  slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
              "decode_attention: slots and positions must be (B,) int64");
  auto sl = slots.contiguous(), ps = positions.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t* pp = ps.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < S, "decode_attention: slot ", sp[b], " out of range [0, ", S, ")");
    TORCH_CHECK(pp[b] >= 0 && pp[b] < T, "decode_attention: position ", pp[b], " out of range [0, ", T, ")");
  }
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0) return out;
  const Shape s{B, H, KVH, D, H / KVH, T, q.stride(0), kc.stride(0), kc.stride(1), kc.stride(2)};
  if (q8) {
    const int8_t* kp = kc.data_ptr<int8_t>();
    const int8_t* vp = vc.data_ptr<int8_t>();
    if (q.scalar_type() == at::kBFloat16) {
      attend(s, q.data_ptr<c10::BFloat16>(), kp, vp, sp, pp, scale, out.data_ptr<c10::BFloat16>());
    } else if (q.scalar_type() == at::kFloat) {
      attend(s, q.data_ptr<float>(), kp, vp, sp, pp, scale, out.data_ptr<float>());
    } else if (q.scalar_type() == at::kHalf) {
      attend(s, q.data_ptr<c10::Half>(), kp, vp, sp, pp, scale, out.data_ptr<c10::Half>());
    } else {
      TORCH_CHECK(false, "decode_attention: q must be bfloat16, float16 or float32, got ", q.scalar_type());
    }
  } else if (q.scalar_type() == at::kBFloat16) {
    attend(s, q.data_ptr<c10::BFloat16>(), kc.data_ptr<c10::BFloat16>(), vc.data_ptr<c10::BFloat16>(), sp, pp, scale,
           out.data_ptr<c10::BFloat16>());
  } else if (q.scalar_type() == at::kFloat) {
    attend(s, q.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), sp, pp, scale, out.data_ptr<float>());
  } else if (q.scalar_type() == at::kHalf) {
    attend(s, q.data_ptr<c10::Half>(), kc.data_ptr<c10::Half>(), vc.data_ptr<c10::Half>(), sp, pp, scale,
           out.data_ptr<c10::Half>());
  } else {
    TORCH_CHECK(false, "decode_attention: q must be bfloat16, float16 or float32, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(JETSERVE_W4A8_NS, m) {
  m.def("decode_attention(Tensor q, Tensor kc, Tensor vc, Tensor slots, Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(JETSERVE_W4A8_NS, CPU, m) { m.impl("decode_attention", &decode_attention); }
