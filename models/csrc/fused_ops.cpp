// The small ops between the matmuls of an eager (uncompiled) step, one pass over memory each, for bfloat16
// activations on CPU: what inductor fuses in the compiled decode graphs, written by hand for prefill, whose
// token count varies from call to call, and for eager decode.
//
//   rms_norm(x, w, eps)            x (T, H) -> w * bf16(x * rsqrt(mean(x^2) + eps)), the sum in float32
//   add_rms_norm_(x, d, w, eps)    x = bf16(x + d) in place (the residual add), then rms_norm(x, w, eps)
//   rope_(qkv, cos, sin, heads, D) rotate-half RoPE in place on the first `heads` heads of each row of qkv
//   silu_mul(gu)                   gu (T, 2I) = [gate | up] -> bf16(bf16(silu(gate)) * up), (T, I)
//   kv_rows(x)                     x (T, KVH, D) -> (T, KVH, D + 4) int8 rows of an int8 KV cache: models/kv_cache.py
//                                  `quantize_rows`, byte for byte (IEEE division, round half to even)
//   kv_values(rows)                rows (T, KVH, D + 4) int8 -> (T, KVH, D) bf16(code * scale): `dequantize_rows`
//   argmax_rows(x, allowed=None)   x (B, V) float32 -> (B,) int64, the first index of each row's maximum, a NaN
//                                  counting as larger than any number: torch's `x.max(-1).indices`, exactly; with
//                                  `allowed` (B, ceil(V/32)) int32 packed token masks, that of the row with every
//                                  disallowed index set to -inf (`sampling.unpack_token_bitmask`, masked_fill)
//   penalties(x, seen, counts, r, f, p)  sampling's repetition / frequency / presence penalties in one pass over
//                                  (B, V) float32 logits (`sampling.apply_penalties`; see the function)
//   sample_rows(x, t, k, p, mp, u) one draw per row of the temperature / top-k / top-p / min-p distribution by
//                                  inversion with the row's uniform u (`sampling._draw`; see the function)
//
// Each rounds where the eager bfloat16 ops of transformers round (every op's result is bfloat16; the norm's
// statistics are float32), so they reproduce those ops up to float32 summation order and silu's exp (relative
// error ~2e-7 before its rounding to bfloat16). models/fused.py holds the plain-PyTorch references; the parity
// tests hold the kernels to them. Rows are split over torch's thread pool; the loops are written for the
// compiler's vectorizer (`omp simd`), so every build of the extension (AVX-512, AVX2, plain C++) compiles them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#ifndef JETSERVE_W4A8_NS
#define JETSERVE_W4A8_NS jetserve_w4a8
#endif

namespace {

using jetserve::bf16_to_float;
using jetserve::exp2_neg;
using jetserve::float_to_bf16;
using jetserve::round_bf16;

constexpr int64_t kGrainElems = 16384;  // elements a task at least, so that short calls stay on one thread
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kClamp = -87.3f;  // exp2_neg clamps below 2^-126 = exp(-87.34)

int64_t grain(int64_t cols) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(cols, 1)); }

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, op, ": ", name, " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) == 0 || t.stride(1) == 1, op, ": ", name, " needs contiguous rows");
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>()); }
uint16_t* mbits(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>()); }

// out = w * bf16(x * rsqrt(mean(x^2) + eps)) for one row of H values
inline void norm_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) {
    const float v = bf16_to_float(x[i]);
    ss += v * v;
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) out[i] = float_to_bf16(bf16_to_float(w[i]) * round_bf16(bf16_to_float(x[i]) * r));
}

void check_norm(const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_rows(x, op, "x");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1), op,
              ": weight must be a contiguous bfloat16 vector of x's width");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm(x, w, "rms_norm");
  const int64_t T = x.size(0), H = x.size(1), sx = x.stride(0);
  at::Tensor out = at::empty({T, H}, x.options());
  const uint16_t *xp = bits(x), *wp = bits(w);
  uint16_t* op = mbits(out);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, grain(H), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) norm_row(xp + t * sx, wp, op + t * H, H, e);
  });
  return out;
}

at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& d, const at::Tensor& w, double eps) {
  check_norm(x, w, "add_rms_norm_");
  check_rows(d, "add_rms_norm_", "delta");
  TORCH_CHECK(x.sizes() == d.sizes(), "add_rms_norm_: x and delta differ in shape: ", x.sizes(), " vs ", d.sizes());
  const int64_t T = x.size(0), H = x.size(1), sx = x.stride(0), sd = d.stride(0);
  at::Tensor out = at::empty({T, H}, x.options());
  uint16_t* xp = mbits(x);
  const uint16_t *dp = bits(d), *wp = bits(w);
  uint16_t* op = mbits(out);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, grain(H), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint16_t* xr = xp + t * sx;
      const uint16_t* dr = dp + t * sd;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) xr[i] = float_to_bf16(bf16_to_float(xr[i]) + bf16_to_float(dr[i]));
      norm_row(xr, wp, op + t * H, H, e);
    }
  });
  return out;
}

// x1' = bf16(bf16(x1 cos) - bf16(x2 sin)), x2' = bf16(bf16(x2 cos) + bf16(x1 sin)) for the halves of each head
void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t D) {
  check_rows(qkv, "rope_", "qkv");
  check_rows(cos, "rope_", "cos");
  check_rows(sin, "rope_", "sin");
  const int64_t T = qkv.size(0), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && heads >= 0 && heads * D <= qkv.size(1), "rope_: ", heads, " heads of ", D,
              " do not fit a row of ", qkv.size(1));
  TORCH_CHECK(cos.size(0) == T && sin.size(0) == T && cos.size(1) == half && sin.size(1) == half,
              "rope_: cos and sin must be (T, head_dim / 2) = (", T, ", ", half, ")");
  const int64_t sq = qkv.stride(0), sc = cos.stride(0), ss = sin.stride(0);
  uint16_t* qp = mbits(qkv);
  const uint16_t *cp = bits(cos), *sp = bits(sin);
  at::parallel_for(0, T, grain(heads * D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t *c = cp + t * sc, *s = sp + t * ss;
      for (int64_t h = 0; h < heads; ++h) {
        uint16_t* x1 = qp + t * sq + h * D;
        uint16_t* x2 = x1 + half;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float a = bf16_to_float(x1[j]), b = bf16_to_float(x2[j]);
          const float cj = bf16_to_float(c[j]), sj = bf16_to_float(s[j]);
          x1[j] = float_to_bf16(round_bf16(a * cj) - round_bf16(b * sj));
          x2[j] = float_to_bf16(round_bf16(b * cj) + round_bf16(a * sj));
        }
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_rows(gu, "silu_mul", "gu");
  TORCH_CHECK(gu.size(1) % 2 == 0, "silu_mul: gu's width must be even (gate and up halves), got ", gu.size(1));
  const int64_t T = gu.size(0), I = gu.size(1) / 2, sg = gu.stride(0);
  at::Tensor out = at::empty({T, I}, gu.options());
  const uint16_t* gp = bits(gu);
  uint16_t* op = mbits(out);
  at::parallel_for(0, T, grain(2 * I), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t *g = gp + t * sg, *u = g + I;
      uint16_t* o = op + t * I;
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) {
        const float x = bf16_to_float(g[j]);
        const float e = exp2_neg(-std::fabs(x) * kLog2e);  // exp(-|x|) in (0, 1]
        // torch's x / (1 + exp(-x)) is -0 (NaN at -inf) once exp(-x) overflows; from kClamp on, e is clamped
        const float sig = x >= 0.f ? 1.f / (1.f + e) : (x < kClamp ? 0.f : e / (1.f + e));
        o[j] = float_to_bf16(round_bf16(x * sig) * bf16_to_float(u[j]));
      }
    }
  });
  return out;
}

at::Tensor kv_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.scalar_type() == at::kBFloat16,
              "kv_rows: x must be a (T, KVH, D) bfloat16 CPU tensor whose rows (D) are contiguous");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), st = x.stride(0), sh = x.stride(1);
  at::Tensor out = at::empty({T, H, D + 4}, x.options().dtype(at::kChar));
  const uint16_t* xp = bits(x);
  int8_t* op = out.data_ptr<int8_t>();
  at::parallel_for(0, T * H, grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* row = xp + (r / H) * st + (r % H) * sh;
      int8_t* o = op + r * (D + 4);
      float m = 0.f;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < D; ++j) m = std::max(m, std::fabs(bf16_to_float(row[j])));
      const float scale = m / 127.f;
      if (scale > 0.f) {
        int64_t j = 0;
#if defined(__AVX512F__)
        const __m512 sv = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
        for (; j + 16 <= D; j += 16) {
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
          const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
          const __m512 c = _mm512_roundscale_ps(_mm512_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, c)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j), _mm512_cvtepi32_epi8(q));
        }
#endif
        for (; j < D; ++j) {
          const float c = __builtin_roundevenf(bf16_to_float(row[j]) / scale);  // half to even; vectorizes
          o[j] = static_cast<int8_t>(static_cast<int32_t>(std::min(127.f, std::max(-127.f, c))));
        }
      } else {
        std::memset(o, 0, D);
      }
      std::memcpy(o + D, &scale, 4);
    }
  });
  return out;
}

at::Tensor kv_values(const at::Tensor& rows) {
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 3 && rows.stride(2) == 1 && rows.scalar_type() == at::kChar &&
                  rows.size(2) > 4,
              "kv_values: rows must be a (T, KVH, D + 4) int8 CPU tensor whose rows are contiguous");
  const int64_t T = rows.size(0), H = rows.size(1), D = rows.size(2) - 4, st = rows.stride(0), sh = rows.stride(1);
  at::Tensor out = at::empty({T, H, D}, rows.options().dtype(at::kBFloat16));
  const int8_t* rp = rows.data_ptr<int8_t>();
  uint16_t* op = mbits(out);
  at::parallel_for(0, T * H, grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* row = rp + (r / H) * st + (r % H) * sh;
      uint16_t* o = op + r * D;
      float scale;
      std::memcpy(&scale, row + D, 4);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) o[j] = float_to_bf16(static_cast<float>(row[j]) * scale);
    }
  });
  return out;
}

// Whether index i of a row is allowed by its packed mask (bit i % 32 of word i / 32); every index without one.
template <bool Masked>
inline bool allowed_at(const uint32_t* bits, int64_t i) {
  return !Masked || ((bits[i >> 5] >> (i & 31)) & 1u);
}

// The first (allowed) index below `end` holding a NaN; -1 if none.
template <bool Masked>
inline int64_t first_nan(const float* x, int64_t end, const uint32_t* bits) {
  for (int64_t i = 0; i < end; ++i)
    if (allowed_at<Masked>(bits, i) && std::isnan(x[i])) return i;
  return -1;
}

// The first index of the maximum of row x (V >= 1 values), a NaN counting as larger than any number. With
// Masked, only the indices its packed mask `bits` allows count, as if the others held -inf. The scan starts from
// -inf at index 0, so a row whose (allowed) values are all -inf gives 0, as torch's max of the masked row. Each
// vector lane keeps the first index of its own maximum (strictly greater replaces); the lanes are then reduced
// to the smallest index holding the maximum. A NaN sends the row to a scalar scan for the first one (torch's
// rule), which finite logits never take.
template <bool Masked>
int64_t scan_argmax(const float* x, int64_t V, const uint32_t* bits) {
  int64_t i = 0, bi = 0;
  float best = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  if (V >= 16) {
    __m512 bv = _mm512_set1_ps(best);
    __m512i cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i bix = cur;
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (; i + 16 <= V; i += 16, cur = _mm512_add_epi32(cur, step)) {
      const __mmask16 ok = Masked ? static_cast<__mmask16>(bits[i >> 5] >> (i & 16)) : static_cast<__mmask16>(0xFFFF);
      const __m512 v = _mm512_loadu_ps(x + i);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(ok, v, bv, _CMP_GT_OQ);
      bv = _mm512_mask_mov_ps(bv, gt, v);
      bix = _mm512_mask_mov_epi32(bix, gt, cur);
      nan |= _mm512_mask_cmp_ps_mask(ok, v, v, _CMP_UNORD_Q);
    }
    if (nan) return first_nan<Masked>(x, i, bits);
    best = _mm512_reduce_max_ps(bv);
    bi = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(bv, _mm512_set1_ps(best), _CMP_EQ_OQ), bix);
  }
#elif defined(__AVX2__)
  if (V >= 8) {
    __m256 bv = _mm256_set1_ps(best);
    __m256i cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i bix = cur;
    const __m256i step = _mm256_set1_epi32(8);
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256 nan = _mm256_setzero_ps();
    for (; i + 8 <= V; i += 8, cur = _mm256_add_epi32(cur, step)) {
      const __m256 v = _mm256_loadu_ps(x + i);
      __m256 gt = _mm256_cmp_ps(v, bv, _CMP_GT_OQ), un = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      if (Masked) {  // the 8 bits of indices i .. i + 7, one per lane
        const __m256i b = _mm256_set1_epi32(static_cast<int32_t>((bits[i >> 5] >> (i & 24)) & 0xFFu));
        const __m256 ok = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, lane_bit), lane_bit));
        gt = _mm256_and_ps(gt, ok);
        un = _mm256_and_ps(un, ok);
      }
      bv = _mm256_blendv_ps(bv, v, gt);
      bix = _mm256_blendv_epi8(bix, cur, _mm256_castps_si256(gt));
      nan = _mm256_or_ps(nan, un);
    }
    if (_mm256_movemask_ps(nan)) return first_nan<Masked>(x, i, bits);
    alignas(32) float lv[8];
    alignas(32) int32_t li[8];
    _mm256_store_ps(lv, bv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(li), bix);
    best = lv[0];
    bi = li[0];
    for (int l = 1; l < 8; ++l) {
      if (lv[l] > best || (lv[l] == best && li[l] < bi)) {
        best = lv[l];
        bi = li[l];
      }
    }
  }
#endif
  for (; i < V; ++i) {  // the tail (or everything): later indices, so only a strictly greater value or a NaN
    if (!allowed_at<Masked>(bits, i)) continue;
    const float v = x[i];
    if (std::isnan(v)) return i;
    if (v > best) {
      best = v;
      bi = i;
    }
  }
  return bi;
}

at::Tensor argmax_rows(const at::Tensor& x, const std::optional<at::Tensor>& allowed) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "argmax_rows: x must be a 2-D float32 CPU tensor");
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0 && V < std::numeric_limits<int32_t>::max() - 16,
              "argmax_rows: rows must have 1 to 2^31 - 18 values");
  TORCH_CHECK(V == 1 || x.stride(1) == 1, "argmax_rows: x needs contiguous rows");
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t ld = x.stride(0);
  if (allowed.has_value() && allowed->defined()) {
    const at::Tensor& a = *allowed;
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kInt && a.dim() == 2 && a.size(0) == B &&
                    a.size(1) == (V + 31) / 32 && a.is_contiguous(),
                "argmax_rows: allowed must be a contiguous (B, ceil(V / 32)) int32 CPU tensor");
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>());
    const int64_t words = a.size(1);
    at::parallel_for(0, B, grain(V), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) op[b] = scan_argmax<true>(xp + b * ld, V, bits + b * words);
    });
  } else {
    at::parallel_for(0, B, grain(V), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) op[b] = scan_argmax<false>(xp + b * ld, V, nullptr);
    });
  }
  return out;
}

// penalties(x, seen, counts, rep, freq, pres): sampling's repetition, frequency and presence penalties in one pass
// (models/sampling.py `apply_penalties` is the reference): y = seen ? (x > 0 ? x / rep : x * rep) : x, then
// y - freq * count, then y - pres where count > 0. The compiler may fuse `y - freq * count` into one FMA (one
// rounding instead of two), so a penalised logit can differ from the reference in its last bit.
at::Tensor penalties(const at::Tensor& x, const at::Tensor& seen, const at::Tensor& counts, const at::Tensor& rep,
                     const at::Tensor& freq, const at::Tensor& pres) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "penalties: x must be a contiguous 2-D float32 CPU tensor");
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(seen.device().is_cpu() && seen.scalar_type() == at::kBool && seen.sizes() == x.sizes() &&
                  seen.is_contiguous(),
              "penalties: seen must be a contiguous bool CPU tensor shaped like x");
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kFloat && counts.sizes() == x.sizes() &&
                  counts.is_contiguous(),
              "penalties: counts must be a contiguous float32 CPU tensor shaped like x");
  for (const at::Tensor* t : {&rep, &freq, &pres})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == B &&
                    t->is_contiguous(),
                "penalties: rep, freq and pres must be (B,) float32 CPU tensors");
  at::Tensor out = at::empty({B, V}, x.options());
  const float *xp = x.data_ptr<float>(), *np = counts.data_ptr<float>();
  const bool* sp = seen.data_ptr<bool>();
  const float *rp = rep.data_ptr<float>(), *fp = freq.data_ptr<float>(), *pp = pres.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, grain(V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float r = rp[b], f = fp[b], pr = pp[b];
      const float* xr = xp + b * V;
      const float* nr = np + b * V;
      const uint8_t* sr = reinterpret_cast<const uint8_t*>(sp) + b * V;
      float* o = op + b * V;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {  // branch-free, so that it vectorizes
        const float t = xr[v], c = nr[v];
        const float div = t / r, mul = t * r;
        const float pen = t > 0.f ? div : mul;
        const float y = (sr[v] != 0 ? pen : t) - f * c;
        o[v] = y - (c > 0.f ? pr : 0.f);
      }
    }
  });
  return out;
}

// sample_rows(x, temperature, top_k, top_p, min_p, u): one draw per row of sampling's warped distribution
// (models/sampling.py `_draw` is the reference): s = x / temperature, then top-k (k >= V: off), top-p (1: off) and
// min-p (0: off) as `apply_warpers` keeps tokens, then the first kept token, in vocabulary order, whose cumulative
// probability exceeds u. Only tokens within a margin of the row's largest logit are gathered (a vector compare
// scan), the margin doubling until they hold every token the filters keep (for top-p: their mass reaches top_p);
// a row without filters draws in one pass over the whole row. No full sort: top-k selects its k tokens
// (nth_element), top-p sorts only the tokens near the point where its mass crosses top_p (`top_p_last`), and the
// kept tokens stay in vocabulary order. Sums are in double, so a token whose top-p mass or cumulative probability
// lies within float32 rounding of the boundary can go the other way than in the reference.
// A NaN logit counts as -inf; a row without a finite logit gives 0.
using Cand = std::pair<float, int32_t>;  // (s, index)

struct RowDraw {
  std::vector<float> s, e;  // the row's x / temperature, and exp(s - max) where a token keeps mass
  std::vector<Cand> cand, sel;  // the gathered tokens in index order; scratch for selecting among them
  std::vector<uint16_t> bucket;  // top_p_last: each candidate's bucket, and each bucket's mass and size
  std::vector<double> bucket_mass;
  std::vector<int32_t> bucket_size;
  std::vector<int32_t> kept;
};

// The filters' order: the larger s first, the smaller index first on a tie (strict and total over a row)
inline bool ahead(const Cand& a, const Cand& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The sum of n floats, added in double (vector lanes in any order): a float sum of a row's masses can be off by
// more than its last tokens' masses, or than one of many tied tokens'
inline double sum_double(const float* x, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i];
  return acc;
}

// The first index of e (V non-negative masses) at which the running sum exceeds u x their sum, found through
// block sums of 256 (in double); where rounding leaves no such index, the last index with mass.
int64_t invert(const float* e, int64_t V, float u) {
  constexpr int64_t kBlk = 256;
  const int64_t nb = (V + kBlk - 1) / kBlk;
  std::vector<double> bs(nb);
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    bs[b] = sum_double(e + b * kBlk, std::min(V, (b + 1) * kBlk) - b * kBlk);
    total += bs[b];
  }
  const double r = static_cast<double>(u) * total;
  double cum = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    if (cum + bs[b] <= r) {
      cum += bs[b];
      continue;
    }
    const int64_t i1 = std::min(V, (b + 1) * kBlk);
    for (int64_t i = b * kBlk; i < i1; ++i) {
      cum += e[i];
      if (e[i] > 0.f && cum > r) return i;
    }
  }
  for (int64_t i = V - 1; i > 0; --i)
    if (e[i] > 0.f) return i;
  return 0;
}

#if defined(__AVX512F__) || defined(__AVX2__)
using namespace jetserve::vec;
#endif

// s = x / temp over a row of V; returns the largest s, a NaN never counting (-inf when there is no number)
inline float scale_row(const float* x, float temp, int64_t V, float* s) {
  float m = kNegInf;
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const VecF tv = vset1(temp);
  VecF mv = vset1(kNegInf);
  for (; i + kLanes <= V; i += kLanes) {
    const VecF v = vdiv(vload(x + i), tv);
    vstore(s + i, v);
    mv = vmax(v, mv);  // max_ps returns its second operand when the first is a NaN
  }
  m = hmax(mv);
#endif
  for (; i < V; ++i) {
    s[i] = x[i] / temp;
    if (s[i] > m) m = s[i];
  }
  return m;
}

// e[i] = exp(s[i] - m) where s[i] - m >= lo (lo >= -87), else 0 (also for NaN and -inf); returns their sum
inline double row_masses(const float* s, float m, float lo, int64_t V, float* e) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const VecF mv = vset1(m), lov = vset1(lo), l2e = vset1(kLog2e);
  for (; i + kLanes <= V; i += kLanes) {
    const VecF d = vsub(vload(s + i), mv);
    vstore(e + i, vkeep_ge(vexp2_neg(vmul(d, l2e)), d, lov));
  }
#endif
  for (; i < V; ++i) {
    const float d = s[i] - m;
    e[i] = d >= lo ? exp2_neg(d * kLog2e) : 0.f;
  }
  return sum_double(e, V);
}

// cand = (s[i], i) for every i with s[i] >= t, in index order (never a NaN)
inline void gather_at_least(const float* s, int64_t V, float t, std::vector<Cand>& cand) {
  cand.clear();
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const VecF tv = vset1(t);
  for (; i + kLanes <= V; i += kLanes) {
    for (uint32_t bits = vmask_ge(vload(s + i), tv); bits; bits &= bits - 1) {
      const int64_t j = i + __builtin_ctz(bits);
      cand.emplace_back(s[j], static_cast<int32_t>(j));
    }
  }
#endif
  for (; i < V; ++i)
    if (s[i] >= t) cand.emplace_back(s[i], static_cast<int32_t>(i));
}

// Top-p over `cand` (any order, every mass finite and >= 0): in `ahead` order a token stays while the mass of the
// tokens before it is below `limit` (> 0). Writes the last token that stays to *last and returns true, or returns
// false when every token stays. Tokens go into 1024 buckets by s (monotone in s, so the buckets keep the order);
// bucket masses find the bucket where the mass crosses `limit`, and only that bucket is sorted and walked.
bool top_p_last(const std::vector<Cand>& cand, const float* e, float m, double limit, RowDraw& w, Cand* last) {
  constexpr int kBuckets = 1024;
  float lo = m;
  for (const auto& c : cand) lo = std::min(lo, c.first);
  lo = std::max(lo, m - 88.f);  // tokens further below have no mass: the last bucket
  const double scale = m - lo > 0.f ? (kBuckets - 1) / static_cast<double>(m - lo) : 0.0;
  const auto bucket_of = [&](float v) {
    return static_cast<int>(std::min(static_cast<double>(m - v) * scale, kBuckets - 1.0));
  };
  auto& bm = w.bucket_mass;
  auto& bn = w.bucket_size;
  bm.assign(kBuckets, 0.0);
  bn.assign(kBuckets, 0);
  w.bucket.resize(cand.size());
  for (size_t j = 0; j < cand.size(); ++j) {
    const int b = bucket_of(cand[j].first);
    w.bucket[j] = static_cast<uint16_t>(b);
    bm[b] += e[cand[j].second];
    ++bn[b];
  }
  double before = 0.0;
  int b = 0;
  while (b < kBuckets && before + bm[b] < limit) before += bm[b++];
  bool first = true;
  for (; b < kBuckets; ++b) {  // past the crossing bucket only where rounding kept all of it
    if (bn[b] == 0) continue;
    auto& sel = w.sel;
    sel.clear();
    for (size_t j = 0; j < cand.size(); ++j)
      if (w.bucket[j] == b) sel.push_back(cand[j]);
    std::sort(sel.begin(), sel.end(), ahead);
    for (const auto& c : sel) {
      if (!first && before >= limit) return true;
      *last = c;
      first = false;
      before += e[c.second];
    }
  }
  return false;
}

int64_t draw_row(const float* x, int64_t V, float temp, int64_t k, float top_p, float min_p, float u, RowDraw& w) {
  w.s.resize(V);
  float* s = w.s.data();
  const float m = scale_row(x, temp, V, s);
  if (!(m > kNegInf)) return 0;
  const bool k_on = k > 0 && k < V, p_on = top_p < 1.f, min_on = min_p > 0.f;
  w.e.resize(V);
  float* e = w.e.data();
  if (!k_on && !p_on) {  // every token stays, min-p aside: inversion over the whole row in vocabulary order
    row_masses(s, m, std::max(min_on ? std::log(min_p) : kNegInf, -87.f), V, e);
    return invert(e, V, u);
  }
  // masses exp(s - m), 0 below -87 and for -inf and NaN (`row_masses`' rule): a top-p row without top-k needs every
  // token's, and their sum as its normaliser; a top-k row only those of its k tokens (below)
  const double full = p_on && !k_on ? row_masses(s, m, -87.f, V, e) : 0.0;
  auto& cand = w.cand;
  for (float margin = 8.f;; margin *= 2.f) {
    const bool all = margin > 120.f;  // every token with mass, and then every other finite one
    gather_at_least(s, V, all ? -std::numeric_limits<float>::max() : m - margin, cand);
    if (all) break;
    if (k_on) {
      if (static_cast<int64_t>(cand.size()) < k) continue;  // the k-th largest lies below the margin
      break;
    }
    double mass = 0.0;
    for (const auto& c : cand) mass += e[c.second];
    if (mass >= top_p * full) break;  // else the nucleus may reach below the margin
  }
  // Each filter keeps a prefix of the candidates in `ahead` order, found without sorting them all: the filters
  // narrow `cand` (still in index order) to the tokens ahead of or at their last kept token.
  const auto keep_through = [&cand](const Cand& last) {
    cand.erase(std::remove_if(cand.begin(), cand.end(), [&last](const Cand& c) { return ahead(last, c); }),
               cand.end());
  };
  if (k_on) {
    if (static_cast<int64_t>(cand.size()) > k) {
      w.sel.assign(cand.begin(), cand.end());
      std::nth_element(w.sel.begin(), w.sel.begin() + (k - 1), w.sel.end(), ahead);
      keep_through(w.sel[k - 1]);
    }
    for (const auto& c : cand) {  // the masses of the k tokens only
      const float d = c.first - m;
      e[c.second] = d >= -87.f ? exp2_neg(d * kLog2e) : 0.f;
    }
  }
  if (p_on) {
    double norm = full;
    if (k_on) {
      norm = 0.0;
      for (const auto& c : cand) norm += e[c.second];
    }
    Cand last;
    if (top_p_last(cand, e, m, top_p * norm, w, &last)) keep_through(last);
  }
  if (min_on) {  // the largest token has s - m = 0 >= log(min_p): it always stays
    const float floor = std::log(min_p);
    cand.erase(std::remove_if(cand.begin(), cand.end(), [&](const Cand& c) { return !(c.first - m >= floor); }),
               cand.end());
  }
  auto& kept = w.kept;
  kept.resize(cand.size());
  for (size_t j = 0; j < cand.size(); ++j) kept[j] = cand[j].second;
  double total = 0.0;
  for (int32_t i : kept) total += e[i];
  const double r = static_cast<double>(u) * total;
  double cum = 0.0;
  int32_t last = kept[0];
  for (int32_t i : kept) {
    if (e[i] > 0.f) last = i;
    cum += e[i];
    if (e[i] > 0.f && cum > r) return i;
  }
  return last;
}

at::Tensor sample_rows(const at::Tensor& x, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& u) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "sample_rows: x must be a contiguous 2-D float32 CPU tensor");
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0 && V < std::numeric_limits<int32_t>::max(), "sample_rows: rows must have 1 to 2^31 - 2 values");
  for (const at::Tensor* t : {&temperature, &top_p, &min_p, &u})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == B &&
                    t->is_contiguous(),
                "sample_rows: temperature, top_p, min_p and u must be (B,) float32 CPU tensors");
  TORCH_CHECK(top_k.device().is_cpu() && top_k.scalar_type() == at::kLong && top_k.dim() == 1 &&
                  top_k.size(0) == B && top_k.is_contiguous(),
              "sample_rows: top_k must be a (B,) int64 CPU tensor");
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  const float *tp = temperature.data_ptr<float>(), *pp = top_p.data_ptr<float>(), *mp = min_p.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const int64_t* kp = top_k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(tp[b] > 0.f && pp[b] > 0.f && pp[b] <= 1.f && mp[b] >= 0.f && mp[b] <= 1.f,
                "sample_rows: row ", b, " needs temperature > 0, 0 < top_p <= 1 and 0 <= min_p <= 1");
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    RowDraw w;
    for (int64_t b = b0; b < b1; ++b) op[b] = draw_row(xp + b * V, V, tp[b], kp[b], pp[b], mp[b], up[b], w);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(JETSERVE_W4A8_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int head_dim) -> ()");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("kv_rows(Tensor x) -> Tensor");
  m.def("kv_values(Tensor rows) -> Tensor");
  m.def("argmax_rows(Tensor x, Tensor? allowed=None) -> Tensor");
  m.def("penalties(Tensor x, Tensor seen, Tensor counts, Tensor rep, Tensor freq, Tensor pres) -> Tensor");
  m.def("sample_rows(Tensor x, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor u) -> Tensor");
}

TORCH_LIBRARY_IMPL(JETSERVE_W4A8_NS, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rope_", &rope_);
  m.impl("silu_mul", &silu_mul);
  m.impl("kv_rows", &kv_rows);
  m.impl("kv_values", &kv_values);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("penalties", &penalties);
  m.impl("sample_rows", &sample_rows);
}
