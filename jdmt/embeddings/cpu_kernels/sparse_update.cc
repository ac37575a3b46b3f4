// Fused sparse optimizer step of one device's local table shard, and the
// pooled lookup of its bags (XLA FFI, CPU; the lookup is at the end).
//
// Same meaning as `jdmt.embeddings.optimizers.sparse_step`: for each slot k
// (a storage buffer's ids), every id of the slot is sorted by row (stable, so
// the occurrences of a row stay in ascending position order), the gradients of
// a row's occurrences (row src[j] of grads for id j, times scale[j] where a
// scale is given: per-sample weights) are summed in that order into a D-float
// buffer, and the optimizer is applied to the row once:
//
//   row-wise Adagrad: m_r += sum(g_r^2) * (1/dim); w_r += -(lr g_r) * (1 / (sqrt(m_r) + eps))
//   Adagrad:          m_r += g_r^2;  w_r += -(lr g_r) / (sqrt(m_r) + eps)
//   SGD:              w_r += -(lr g_r)
//
// The arithmetic is written the way XLA:CPU evaluates `optimizers.apply_rows`
// (division by a broadcast or a constant becomes a multiplication by the
// reciprocal; m + g*g is a fused multiply-add on hosts with FMA), so results
// are bit-identical to the XLA path, except that the row-wise sum of squares
// uses a fixed 16-lane tree, which XLA matches for some D (64 and 16 on an
// AVX-512 host) and differs from by an ulp for others.
//
// The table (and accumulator) are updated in place: the wrapper aliases them to
// the outputs. If XLA hands us distinct output buffers anyway, the inputs are
// copied first, so the result is correct either way.
//
// Sorting: per slot, LSD radix sort of packed (row - min_row, src) items on
// the row bits only (the gradient source rides along in the low bits; the
// input is in position order and every pass is stable). Items
// are uint32 when row and bag bits fit, else uint64. Cost is O(ids) per slot,
// independent of the table's rows. The rows of each unique row are then
// prefetched a few unique rows ahead (they are mostly cache and TLB misses).
//
// 16-bit tables (bf16 / f16; the gradients, lr and accumulators stay f32):
// each touched row is widened to f32 (exact), updated with exactly the f32
// arithmetic above, and written back rounded stochastically with the random
// bits sr_bits(seed, row, col) of a runtime `seed`, as
// `jdmt.precision.stochastic_round` does (bit-identical to it; f32
// tables ignore the seed). The pooled lookup widens each row as it adds it.
//
// Ids outside [0, R) are skipped (never written out of bounds); negative ids
// mean "no id". Slots are processed one after another, or split over
// `threads` std::threads: whole slots per thread when there are at least as
// many slots (distinct slots must not share rows; they never do: each slot is
// its own table), else each slot's ids split by row range over the threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

enum Kind : int32_t { kRowwiseAdagrad = 0, kAdagrad = 1, kSgd = 2 };

struct Problem {
  void* table;         // [R, D] of the storage type (float, Bf16, F16)
  float* accum;        // [R] (row-wise), [R, D] (Adagrad), null (SGD)
  const int32_t* ids;  // [K, n]
  const int32_t* src;  // [K, n] gradient row of each id, in [0, G)
  const float* grads;  // [K, G, D]
  const float* scale;  // [K, n] each id's gradient multiplier (per-sample weights), or null
  int64_t R, D, K, n, G;
  float lr, eps, inv_dim;
  int32_t kind;
  uint32_t seed;       // stochastic rounding of 16-bit tables
};

struct Scratch {
  std::vector<uint64_t> a, b;  // sort buffers (uint32 items use the first half)
  std::vector<float> acc;
  std::vector<float> row;  // a 16-bit table's row widened to f32
  std::vector<uint32_t> hist;
  std::vector<uint32_t> start;  // first item of each unique row
};

inline int BitsFor(uint64_t x) {  // bits needed to hold values 0..x
  int b = 0;
  while (b < 64 && (x >> b) != 0) ++b;
  return b;
}

// Stable LSD radix sort of items by bits [shift, shift + bits). Returns the
// buffer holding the result (a or b).
template <typename T>
T* RadixSort(T* a, T* b, int64_t m, int shift, int bits, std::vector<uint32_t>& hist) {
  if (bits <= 0 || m <= 1) return a;
  const int passes = (bits + 10) / 11;
  const int digit = (bits + passes - 1) / passes;
  const uint32_t buckets = 1u << digit;
  const T mask = static_cast<T>(buckets - 1);
  hist.assign(static_cast<size_t>(buckets) * passes, 0);
  // All histograms in one read pass.
  for (int64_t i = 0; i < m; ++i) {
    const T v = a[i] >> shift;
    for (int p = 0; p < passes; ++p) {
      ++hist[p * buckets + static_cast<uint32_t>((v >> (p * digit)) & mask)];
    }
  }
  for (int p = 0; p < passes; ++p) {
    uint32_t* h = hist.data() + p * buckets;
    // Skip a pass whose digit is the same for every item.
    bool trivial = false;
    for (uint32_t d = 0; d < buckets; ++d) {
      if (h[d] == static_cast<uint32_t>(m)) { trivial = true; break; }
      if (h[d] != 0) break;
    }
    if (trivial) continue;
    uint32_t sum = 0;
    for (uint32_t d = 0; d < buckets; ++d) {
      const uint32_t c = h[d];
      h[d] = sum;
      sum += c;
    }
    const int s = shift + p * digit;
    for (int64_t i = 0; i < m; ++i) {
      const T v = a[i];
      b[h[static_cast<uint32_t>((v >> s) & mask)]++] = v;
    }
    std::swap(a, b);
  }
  return a;
}

inline void Prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1, 3);
}

// Adagrad's m += g * g: XLA:CPU contracts it to a fused multiply-add when the
// host has FMA (it compiles for the host's features), so do the same to give
// bit-identical results; the library itself is built without -march flags.
// x86-64: FMA is an extension, compiled for by attribute and chosen at run
// time; aarch64: fused multiply-add is in the base ISA; other targets: none.
#if defined(__x86_64__) || defined(__i386__)
#define JDMT_FMA_TARGET __attribute__((target("fma")))
#define JDMT_HOST_FMA __builtin_cpu_supports("fma")
#elif defined(__aarch64__)
#define JDMT_FMA_TARGET
#define JDMT_HOST_FMA true
#else
#define JDMT_FMA_TARGET
#define JDMT_HOST_FMA false
#endif

JDMT_FMA_TARGET void AdagradRowFma(float* w, float* a, const float* g, int64_t D, float lr,
                                   float eps) {
  for (int64_t d = 0; d < D; ++d) {
    const float m = __builtin_fmaf(g[d], g[d], a[d]);
    a[d] = m;
    w[d] += -(lr * g[d]) / (std::sqrt(m) + eps);
  }
}

void AdagradRowPlain(float* w, float* a, const float* g, int64_t D, float lr, float eps) {
  for (int64_t d = 0; d < D; ++d) {
    const float m = a[d] + g[d] * g[d];
    a[d] = m;
    w[d] += -(lr * g[d]) / (std::sqrt(m) + eps);
  }
}

const bool kHostFma = JDMT_HOST_FMA;

// Apply the optimizer to one row `w` (f32; table row `row`) with its summed
// gradient `g`.
inline void ApplyRow(const Problem& p, int64_t row, float* w, const float* g) {
  const int64_t D = p.D;
  const float lr = p.lr;
  if (p.kind == kRowwiseAdagrad) {
    // Sum of squares in 16 interleaved partial sums combined as a tree: the
    // order XLA:CPU's vectorised row reduction uses for D = 64 on an AVX-512
    // host (other D / hosts may differ from XLA by an ulp).
    float part[16] = {0};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      for (int l = 0; l < 16; ++l) part[l] += g[d + l] * g[d + l];
    }
    for (int l = 0; d < D; ++d, ++l) part[l] += g[d] * g[d];
    for (int h = 8; h >= 1; h /= 2) {
      for (int l = 0; l < h; ++l) part[l] += part[l + h];
    }
    // mean = sum * (1 / dim), as XLA simplifies the division by a constant.
    const float m = p.accum[row] + part[0] * p.inv_dim;
    p.accum[row] = m;
    // XLA rewrites x / broadcast(den) as x * broadcast(1 / den), and the
    // scatter-add into the table is a separate add (no fused multiply-add).
    const float r = 1.0f / (std::sqrt(m) + p.eps);
    for (int64_t d2 = 0; d2 < D; ++d2) w[d2] += -(lr * g[d2]) * r;
  } else if (p.kind == kAdagrad) {
    if (kHostFma) {
      AdagradRowFma(w, p.accum + row * D, g, D, lr, p.eps);
    } else {
      AdagradRowPlain(w, p.accum + row * D, g, D, lr, p.eps);
    }
  } else {
    for (int64_t d2 = 0; d2 < D; ++d2) w[d2] += -(lr * g[d2]);
  }
}

// ------------------------------------------------------------- 16-bit storage
//
// Storage types of a table's elements: float, or the bits of a bf16 / f16.
// Widening to f32 and the stochastic rounding back are written with integer
// bit manipulation (no F16C / fp16 hardware), matching XLA:CPU's conversions
// and `precision.stochastic_round` bit for bit.

struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline uint32_t FloatBits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

inline float BitsFloat(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// Selection by masks (all ones where a condition holds) rather than
// branches, so that the loops over a row vectorise.
inline uint32_t Mask(bool c) { return 0u - static_cast<uint32_t>(c); }

inline float Widen(float v) { return v; }
inline float Widen(Bf16 v) { return BitsFloat(static_cast<uint32_t>(v.bits) << 16); }

inline float Widen(F16 v) {
  const uint32_t h = v.bits, sign = (h & 0x8000u) << 16, em = h & 0x7FFFu;
  // normal: rebias the exponent; inf / NaN: exponent 255, a NaN quieted as
  // XLA:CPU widens it; subnormal (or zero): em * 2^-24, exact and normal in f32
  const uint32_t normal = (em << 13) + (112u << 23);
  const uint32_t special = (em << 13) | 0x7F800000u | (static_cast<uint32_t>(em > 0x7C00u) << 22);
  const uint32_t sub = FloatBits(static_cast<float>(static_cast<int32_t>(em)) * (1.0f / 16777216.0f));
  const uint32_t is_special = Mask(em >= 0x7C00u), is_sub = Mask(em < 0x400u);
  return BitsFloat(sign | (special & is_special) | (sub & is_sub) | (normal & ~(is_special | is_sub)));
}

// An f16 row widened (o = row) or added (o += row) by the hardware's
// conversion where there is one: x86's F16C (chosen at run time) or aarch64's
// fcvt. Both give Widen(F16)'s bits (exact for every finite value; a NaN
// quieted, its payload kept), several times faster than the bit arithmetic.
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx,f16c"))) void F16RowF16c(float* o, const F16* row, int64_t D, bool add) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(row);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + d)));
    if (add) v = _mm256_add_ps(_mm256_loadu_ps(o + d), v);
    _mm256_storeu_ps(o + d, v);
  }
  for (; d < D; ++d) {
    const float x = _cvtsh_ss(h[d]);
    o[d] = add ? o[d] + x : x;
  }
}
const bool kHostF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
inline bool F16RowFast(float* o, const F16* row, int64_t D, bool add) {
  if (!kHostF16c) return false;
  F16RowF16c(o, row, D, add);
  return true;
}
#elif defined(__aarch64__)
inline bool F16RowFast(float* o, const F16* row, int64_t D, bool add) {
  const __fp16* h = reinterpret_cast<const __fp16*>(row);
  if (add) {
    for (int64_t d = 0; d < D; ++d) o[d] += static_cast<float>(h[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(h[d]);
  }
  return true;
}
#else
inline bool F16RowFast(float*, const F16*, int64_t, bool) { return false; }
#endif

// `precision.sr_bits`: murmur3's finaliser over (seed, row), then the column.
inline uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}
inline uint32_t RowBits(uint32_t seed, int64_t row) {
  return Mix32(seed ^ (static_cast<uint32_t>(row) * 0x632BE5ABu));
}
inline uint32_t SrBits(uint32_t row_bits, int64_t col) {
  return Mix32(row_bits + static_cast<uint32_t>(col) * 0x85157AF5u);
}

// bf16: add the top 16 random bits to x's bits and truncate; inf kept, NaN
// becomes XLA's quiet NaN (sign kept).
inline uint16_t RoundBf16(float x, uint32_t h) {
  const uint32_t b = FloatBits(x), ab = b & 0x7FFFFFFFu;
  const uint32_t finite = (b + (h >> 16)) >> 16;  // (no overflow for finite b)
  const uint32_t is_nan = Mask(ab > 0x7F800000u);
  const uint32_t nonfinite = ((((b >> 16) & 0x8000u) | 0x7FC0u) & is_nan) | ((b >> 16) & ~is_nan);
  const uint32_t is_nonfinite = Mask(ab >= 0x7F800000u);
  return static_cast<uint16_t>((nonfinite & is_nonfinite) | (finite & ~is_nonfinite));
}

// f16: |x| (saturated at 65504) = q * 2^k with the f16 ulp 2^k at |x|, k =
// max(e, -14) - 10; rounds to 2^k * (floor(q) + [u < q - floor(q)]), u =
// (h >> 8) / 2^24, x's sign kept. Every float operation below is exact, as in
// XLA. inf kept, NaN as XLA:CPU converts it. Zeros and f32 subnormals give +0
// as in XLA:CPU, which runs with denormals flushed (there |x| * 2^-k is 0 and
// `x < 0` false); the kernel runs in that environment (its threads inherit it),
// so its f32 arithmetic does not hand subnormals here anyway.
inline uint16_t RoundF16(float x, uint32_t h) {
  const uint32_t b = FloatBits(x);
  const uint32_t sign = (b >> 16) & 0x8000u, ab = b & 0x7FFFFFFFu;
  const uint32_t nonfinite =  // inf, or NaN: quiet, the top payload bits kept
      sign | 0x7C00u | ((((b >> 13) & 0x3FFu) | 0x200u) & Mask((ab & 0x7FFFFFu) != 0));
  const uint32_t sat = ab ^ ((ab ^ 0x477FE000u) & Mask(ab > 0x477FE000u));  // <= 65504, the largest f16
  const int ek = std::max(static_cast<int>(sat >> 23) - 127, -14);
  // q = |x| * 2^-k in [0, 2048), exact: the exponent moved (|x| normal here)
  const float q = BitsFloat(sat + (static_cast<uint32_t>(10 - ek) << 23));
  const float fl = static_cast<float>(static_cast<int32_t>(q));  // floor (q >= 0)
  const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
  const float frac = q - fl;
  const uint32_t r = static_cast<uint32_t>(static_cast<int32_t>(fl)) + static_cast<uint32_t>(u < frac);
  // 2^k * r as f16 bits: e >= -14: r in [1024, 2048], exponent field e + 15 (a
  // carry of r = 2048 moves to the next; never past 65504, whose q is exact);
  // below: the subnormal count r (1024: the smallest normal).
  const uint32_t finite = sign | ((static_cast<uint32_t>(ek + 14) << 10) + r);
  const uint32_t is_nonfinite = Mask(ab >= 0x7F800000u), is_normal = Mask(ab >= 0x00800000u);
  return static_cast<uint16_t>((nonfinite & is_nonfinite) | (finite & is_normal & ~is_nonfinite));
}

inline Bf16 Round(float x, uint32_t h, Bf16) { return Bf16{RoundBf16(x, h)}; }
inline F16 Round(float x, uint32_t h, F16) { return F16{RoundF16(x, h)}; }

// The write-back of a 16-bit row. Hashing and rounding vectorise much better
// with AVX2 (32-bit lane multiplies) than with x86-64's baseline, so on x86 a
// copy compiled for AVX2 is chosen at run time (integer and exact float
// operations only: the same bits either way).
template <typename W>
inline void RoundRowBody(W* w, const float* x, int64_t D, uint32_t rb) {
  for (int64_t d = 0; d < D; ++d) w[d] = Round(x[d], SrBits(rb, d), W{});
}

#if defined(__x86_64__) || defined(__i386__)
template <typename W>
__attribute__((target("avx2"))) void RoundRowAvx2(W* w, const float* x, int64_t D, uint32_t rb) {
  RoundRowBody(w, x, D, rb);
}
const bool kHostAvx2 = __builtin_cpu_supports("avx2");
#endif

template <typename W>
inline void RoundRow(W* w, const float* x, int64_t D, uint32_t rb) {
#if defined(__x86_64__) || defined(__i386__)
  if (kHostAvx2) {
    RoundRowAvx2(w, x, D, rb);
    return;
  }
#endif
  RoundRowBody(w, x, D, rb);
}

// Update table row `row` with its summed gradient `g`: an f32 row in place; a
// 16-bit row widened into `tmp` (D floats), updated, and rounded back.
template <typename W>
inline void UpdateRow(const Problem& p, int64_t row, const float* g, float* tmp) {
  const int64_t D = p.D;
  W* w = static_cast<W*>(p.table) + row * D;
  bool fast = false;
  if constexpr (std::is_same_v<W, F16>) fast = F16RowFast(tmp, w, D, false);
  if (!fast) {
    for (int64_t d = 0; d < D; ++d) tmp[d] = Widen(w[d]);
  }
  ApplyRow(p, row, tmp, g);
  RoundRow(w, tmp, D, RowBits(p.seed, row));
}

template <>
inline void UpdateRow<float>(const Problem& p, int64_t row, const float* g, float*) {
  ApplyRow(p, row, static_cast<float*>(p.table) + row * p.D, g);
}

// Walk the sorted items: for each run of equal rows, sum the run's gradients
// (in position order) and apply the optimizer to the row once. The runs are
// found first, so the table rows of the next few unique rows can be
// prefetched (they are mostly cache misses: one row per page of the table).
template <typename T, typename W>
void Walk(const Problem& p, int64_t k, const T* srt, int64_t m, int pbits, int64_t lo,
          Scratch& s) {
  const int64_t D = p.D;
  const W* table = static_cast<const W*>(p.table);
  const T pmask = (static_cast<T>(1) << pbits) - 1;
  const float* gk = p.grads + k * p.G * D;
  float* acc = s.acc.data();
  float* tmp = s.row.data();
  // Runs: start[u] is the first item of unique row u; start[U] = m.
  if (s.start.size() < static_cast<size_t>(m) + 1) s.start.resize(m + 1);
  uint32_t* start = s.start.data();
  int64_t U = 0;
  start[U++] = 0;
  for (int64_t i = 1; i < m; ++i) {
    if ((srt[i] >> pbits) != (srt[i - 1] >> pbits)) start[U++] = static_cast<uint32_t>(i);
  }
  start[U] = static_cast<uint32_t>(m);
  constexpr int64_t kAheadRow = 8, kAheadGrad = 8;
  const int64_t rbytes = D * 4, wbytes = D * static_cast<int64_t>(sizeof(W));
  auto row_of = [&](int64_t u) { return lo + static_cast<int64_t>(srt[start[u]] >> pbits); };
  // Items carry their gradient row; with per-id scales, their position (the
  // row is src[position], and the scale scale[position]).
  const int32_t* srck = p.src + k * p.n;
  const float* sck = p.scale == nullptr ? nullptr : p.scale + k * p.n;
  auto grad_of = [&](int64_t i) {
    const int64_t x = static_cast<int64_t>(srt[i] & pmask);
    return gk + static_cast<int64_t>(sck != nullptr ? srck[x] : x) * D;
  };
  for (int64_t u = 0; u < std::min<int64_t>(U, kAheadRow); ++u) Prefetch(table + row_of(u) * D, wbytes);
  for (int64_t i = 0; i < std::min<int64_t>(m, kAheadGrad); ++i) Prefetch(grad_of(i), rbytes);
  for (int64_t u = 0; u < U; ++u) {
    if (u + kAheadRow < U) {
      const int64_t nr = row_of(u + kAheadRow);
      Prefetch(table + nr * D, wbytes);
      if (p.kind == kAdagrad) Prefetch(p.accum + nr * D, rbytes);
      else if (p.kind == kRowwiseAdagrad) __builtin_prefetch(p.accum + nr, 1, 3);
    }
    const int64_t b = start[u], e = start[u + 1];
    if (sck == nullptr) {
      {
        if (b + kAheadGrad < m) Prefetch(grad_of(b + kAheadGrad), rbytes);
        const float* g = grad_of(b);
        for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f + g[d];
      }
      for (int64_t i = b + 1; i < e; ++i) {
        if (i + kAheadGrad < m) Prefetch(grad_of(i + kAheadGrad), rbytes);
        const float* g = grad_of(i);
        for (int64_t d = 0; d < D; ++d) acc[d] += g[d];
      }
    } else {  // each gradient times its id's scale (multiply, then add)
      for (int64_t i = b; i < e; ++i) {
        if (i + kAheadGrad < m) Prefetch(grad_of(i + kAheadGrad), rbytes);
        const float* g = grad_of(i);
        const float c = sck[srt[i] & pmask];
        if (i == b) {
          for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f + g[d] * c;
        } else {
          for (int64_t d = 0; d < D; ++d) acc[d] += g[d] * c;
        }
      }
    }
    UpdateRow<W>(p, row_of(u), acc, tmp);
  }
}

// Items (row - lo) << pbits | gradient row (or, `by_pos`, position) of the
// valid ids of a slot, in position order.
template <typename T>
void Pack(const int32_t* ids, const int32_t* src, int64_t n, int64_t R, int64_t G, int64_t lo,
          int pbits, bool by_pos, T* a) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    const int64_t g = src[i];
    if (id >= 0 && id < R && g >= 0 && g < G)
      a[c++] = (static_cast<T>(id - lo) << pbits) | static_cast<T>(by_pos ? i : g);
  }
}

template <typename T, typename W>
void SortWalk(const Problem& p, int64_t k, T* a, T* b, int64_t m, int pbits, int rbits,
              int64_t lo, Scratch& s) {
  if (m == 0) return;  // (Walk assumes at least one item)
  const T* srt = RadixSort<T>(a, b, m, pbits, rbits, s.hist);
  Walk<T, W>(p, k, srt, m, pbits, lo, s);
}

// Scratch rows of D floats (the widened row only for 16-bit tables).
template <typename W>
void Sized(Scratch& s, int64_t D) {
  s.acc.resize(std::max<int64_t>(D, 1));
  if (!std::is_same<W, float>::value) s.row.resize(std::max<int64_t>(D, 1));
}

// One slot over nt threads: the items are split by row range into nt stable
// partitions (a -> b; a row's occurrences stay in position order), and each
// thread sorts and walks its own partition (the row ranges are disjoint, so
// no two threads touch a row). The same bits as one thread.
template <typename T, typename W>
void SortWalkThreaded(const Problem& p, int64_t k, T* a, T* b, int64_t m, int pbits, int rbits,
                      int64_t lo, int64_t nt) {
  auto part = [&](T v) {
    return static_cast<int64_t>((static_cast<uint64_t>(v >> pbits) * static_cast<uint64_t>(nt)) >> rbits);
  };
  std::vector<int64_t> off(nt + 1, 0);
  for (int64_t i = 0; i < m; ++i) ++off[part(a[i]) + 1];
  for (int64_t t = 0; t < nt; ++t) off[t + 1] += off[t];
  std::vector<int64_t> pos(off.begin(), off.end() - 1);
  for (int64_t i = 0; i < m; ++i) b[pos[part(a[i])]++] = a[i];
  std::vector<Scratch> scratch(nt);
  auto work = [&](int64_t t) {
    Sized<W>(scratch[t], p.D);
    SortWalk<T, W>(p, k, b + off[t], a + off[t], off[t + 1] - off[t], pbits, rbits, lo, scratch[t]);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < nt; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

// Below this many ids a slot is not split over threads.
constexpr int64_t kMinIdsToSplit = 32768;

template <typename W>
void Slot(const Problem& p, int64_t k, Scratch& s, int64_t nt = 1) {
  const int32_t* ids = p.ids + k * p.n;
  const int32_t* src = p.src + k * p.n;
  const int64_t n = p.n, R = p.R;
  int64_t lo = INT64_MAX, hi = -1, m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    if (id >= 0 && id < R && src[i] >= 0 && src[i] < p.G) {
      lo = std::min(lo, id);
      hi = std::max(hi, id);
      ++m;
    }
  }
  if (m == 0) return;
  // Low bits: the gradient row of the id. The items are packed in position
  // order and the sort is stable, so each row's occurrences stay in position
  // order.
  const bool by_pos = p.scale != nullptr;
  const int pbits = BitsFor(static_cast<uint64_t>(by_pos ? n - 1 : p.G - 1));
  const int rbits = BitsFor(static_cast<uint64_t>(hi - lo));
  if (static_cast<size_t>(n) > s.a.size()) {
    s.a.resize(n);
    s.b.resize(n);
  }
  const bool split = nt > 1 && m >= kMinIdsToSplit;
  if (pbits + rbits <= 32) {
    uint32_t* a = reinterpret_cast<uint32_t*>(s.a.data());
    uint32_t* b = reinterpret_cast<uint32_t*>(s.b.data());
    Pack<uint32_t>(ids, src, n, R, p.G, lo, pbits, by_pos, a);
    if (split) SortWalkThreaded<uint32_t, W>(p, k, a, b, m, pbits, rbits, lo, nt);
    else SortWalk<uint32_t, W>(p, k, a, b, m, pbits, rbits, lo, s);
  } else {
    uint64_t* a = s.a.data();
    uint64_t* b = s.b.data();
    Pack<uint64_t>(ids, src, n, R, p.G, lo, pbits, by_pos, a);
    if (split) SortWalkThreaded<uint64_t, W>(p, k, a, b, m, pbits, rbits, lo, nt);
    else SortWalk<uint64_t, W>(p, k, a, b, m, pbits, rbits, lo, s);
  }
}

template <typename W>
void Run(const Problem& p, int64_t threads) {
  threads = std::max<int64_t>(1, threads);
  if (threads > p.K) {  // fewer slots than threads: each slot split over the threads
    Scratch s;
    Sized<W>(s, p.D);
    for (int64_t k = 0; k < p.K; ++k) Slot<W>(p, k, s, threads);
    return;
  }
  auto work = [&p](int64_t t, int64_t nt) {
    Scratch s;
    Sized<W>(s, p.D);
    for (int64_t k = t; k < p.K; k += nt) Slot<W>(p, k, s);
  };
  if (threads == 1) {
    work(0, 1);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work, t, threads);
  work(0, threads);
  for (auto& th : pool) th.join();
}

std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}

// The storage type of a table's elements (kBad: not one a table may have).
// jdmt's state holds 16-bit tables as their bit patterns, bf16 as U16 and f16
// as S16 (`jdmt.precision.storage_dtype`: XLA:CPU gathers and scatters
// integers in place); the typed BF16 / F16 buffers are accepted too.
enum class Store { kF32, kBf16, kF16, kBad };

Store StoreOf(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return Store::kF32;
    case ffi::DataType::BF16:
    case ffi::DataType::U16: return Store::kBf16;
    case ffi::DataType::F16:
    case ffi::DataType::S16: return Store::kF16;
    default: return Store::kBad;
  }
}

ffi::Error Impl(int32_t kind, ffi::AnyBuffer table, float* accum_in, float* accum_out,
                ffi::Span<const int64_t> accum_dims, size_t accum_bytes,
                ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> src,
                ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> lr,
                ffi::Buffer<ffi::U32> seed, ffi::Result<ffi::AnyBuffer> table_out, float eps,
                float dim, int64_t threads) {
  auto td = table.dimensions(), idd = ids.dimensions(), sd = src.dimensions(),
       gd = grads.dimensions();
  const Store store = StoreOf(table.element_type());
  if (store == Store::kBad)
    return ffi::Error::InvalidArgument("table must be f32, bf16 or f16, got data type " +
                                       std::to_string(static_cast<int>(table.element_type())));
  if (td.size() != 2) return ffi::Error::InvalidArgument("table must be [R, D], got " + Dims(td));
  if (table_out->element_type() != table.element_type() ||
      table_out->element_count() != table.element_count())
    return ffi::Error::InvalidArgument("table output differs from the table in type or shape");
  const int64_t R = td[0], D = td[1];
  if (idd.size() != 2) return ffi::Error::InvalidArgument("ids must be i32[K, n], got " + Dims(idd));
  const int64_t K = idd[0], n = idd[1];
  if (sd.size() != 2 || sd[0] != K || sd[1] != n)
    return ffi::Error::InvalidArgument("src must be i32[K, n] like ids " + Dims(idd) + ", got " + Dims(sd));
  if (gd.size() != 3 || gd[0] != K || gd[2] != D)
    return ffi::Error::InvalidArgument("grads must be f32[K, G, D], got " + Dims(gd) +
                                       " for ids " + Dims(idd) + ", table " + Dims(td));
  const int64_t G = gd[1];
  if (scale.element_count() != 0 && scale.element_count() != static_cast<size_t>(K * n))
    return ffi::Error::InvalidArgument("scale must be f32[K, n] like ids " + Dims(idd) +
                                       " or empty, got " + Dims(scale.dimensions()));
  if (lr.element_count() != 1) return ffi::Error::InvalidArgument("lr must be a scalar");
  if (seed.element_count() != 1) return ffi::Error::InvalidArgument("seed must be a u32 scalar");
  if (kind == kRowwiseAdagrad) {
    if (accum_dims.size() != 1 || accum_dims[0] != R)
      return ffi::Error::InvalidArgument("row-wise Adagrad accum must be f32[R], got " + Dims(accum_dims));
  } else if (kind == kAdagrad) {
    if (accum_dims.size() != 2 || accum_dims[0] != R || accum_dims[1] != D)
      return ffi::Error::InvalidArgument("Adagrad accum must be f32[R, D], got " + Dims(accum_dims));
  } else if (kind != kSgd) {
    return ffi::Error::InvalidArgument("unknown optimizer kind " + std::to_string(kind));
  }
  void* t = table_out->untyped_data();
  if (t != table.untyped_data()) std::memcpy(t, table.untyped_data(), table.size_bytes());
  if (accum_out != nullptr && accum_out != accum_in) std::memcpy(accum_out, accum_in, accum_bytes);
  if (K == 0 || n == 0 || R == 0 || D == 0 || G == 0) return ffi::Error::Success();
  Problem p;
  p.table = t;
  p.accum = kind == kSgd ? nullptr : accum_out;
  p.ids = ids.typed_data();
  p.src = src.typed_data();
  p.grads = grads.typed_data();
  p.scale = scale.element_count() == 0 ? nullptr : scale.typed_data();
  p.R = R; p.D = D; p.K = K; p.n = n; p.G = G;
  p.lr = lr.typed_data()[0];
  p.eps = eps;
  p.inv_dim = 1.0f / (dim > 0 ? dim : static_cast<float>(D));
  p.kind = kind;
  p.seed = seed.typed_data()[0];
  if (store == Store::kF32) Run<float>(p, threads);
  else if (store == Store::kBf16) Run<Bf16>(p, threads);
  else Run<F16>(p, threads);
  return ffi::Error::Success();
}

ffi::Error UpdateImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::F32> accum,
                      ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> src,
                      ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> lr,
                      ffi::Buffer<ffi::U32> seed, ffi::Result<ffi::AnyBuffer> table_out,
                      ffi::Result<ffi::Buffer<ffi::F32>> accum_out, int32_t kind, float eps,
                      float dim, int64_t threads) {
  if (kind == kSgd) return ffi::Error::InvalidArgument("use jdmt_sparse_update_sgd for SGD");
  if (accum_out->element_count() != accum.element_count())
    return ffi::Error::InvalidArgument("accum output shape differs from input");
  return Impl(kind, table, accum.typed_data(), accum_out->typed_data(), accum.dimensions(),
              accum.size_bytes(), ids, src, grads, scale, lr, seed, table_out, eps, dim, threads);
}

ffi::Error SgdImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids,
                   ffi::Buffer<ffi::S32> src, ffi::Buffer<ffi::F32> grads,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> lr, ffi::Buffer<ffi::U32> seed,
                   ffi::Result<ffi::AnyBuffer> table_out, int64_t threads) {
  return Impl(kSgd, table, nullptr, nullptr, {}, 0, ids, src, grads, scale, lr, seed, table_out, 0.0f,
              0.0f, threads);
}

// ---------------------------------------------------------------- pooled lookup
//
// out[b] = sum over p of table[ids[b, p]], positions in ascending order, ids
// outside [0, R) skipped (a bag with none is zeros). The same sum, in the same
// order, as `routing.pool_rows` (its first valid row, then one row added after
// another), so results are bit-identical to the XLA path (up to the sign of a
// zero). A 16-bit table's rows are widened to f32 as they are added (the same
// bits as the f32 sum of the widened table). The next bag's rows are prefetched while one bag is summed (they are
// mostly cache and TLB misses); bags are split over `threads` std::threads.

// The first valid row of a bag (copied) and each later one (added).
inline void FirstRow(float* o, const float* row, int64_t D) { std::memcpy(o, row, sizeof(float) * D); }
template <typename W>
inline void FirstRow(float* o, const W* row, int64_t D) {
  if constexpr (std::is_same_v<W, F16>) {
    if (F16RowFast(o, row, D, false)) return;
  }
  for (int64_t d = 0; d < D; ++d) o[d] = Widen(row[d]);
}
template <typename W>
inline void AddRow(float* o, const W* row, int64_t D) {
  if constexpr (std::is_same_v<W, F16>) {
    if (F16RowFast(o, row, D, true)) return;
  }
  for (int64_t d = 0; d < D; ++d) o[d] += Widen(row[d]);
}

// The order the bags are visited in. The bags are [Bk, K] (sample by sample,
// K tables each: bag j * K + k), read from `ids` and written to `out` at that
// index; with K > 1 they are visited table by table (visit v is bag
// (v % Bk) * K + v / Bk), which keeps each table's hot rows in cache while
// the embeddings come out in the samples' order, with no transpose before or
// after. K = 1: in order.
struct Visit {
  int64_t K, per;
};
inline int64_t BagOf(int64_t v, const Visit& t) {
  return t.K == 1 ? v : (v % t.per) * t.K + v / t.per;
}

// Weighted (per-sample weights): the first valid row times its weight, then
// each later row times its weight added (multiply, then add: no fused
// multiply-add, as XLA's `pool_rows` with weights).
template <typename W>
inline void FirstRowW(float* __restrict o, const W* __restrict row, float w, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] = Widen(row[d]) * w;
}
template <typename W>
inline void AddRowW(float* __restrict o, const W* __restrict row, float w, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] += Widen(row[d]) * w;
}

// kD > 0: D is kD, known when compiled: the bag's sum stays in registers
// (a local array of kD floats) and is written once (the same additions in the
// same order as summing into `out`: the same bits).
template <typename W, bool kWeighted, int64_t kD = 0>
void PoolBags(const W* table, const int32_t* ids, const float* wts, float* out, int64_t R,
              int64_t Dr, int64_t P, int64_t b0, int64_t b1, Visit v) {
  const int64_t D = kD ? kD : Dr;
  constexpr int64_t kStep = 64 / sizeof(W);  // elements per cache line
  constexpr int64_t kAhead = 2;  // bags prefetched ahead
  float local[kD ? kD : 1];
  for (int64_t b = b0; b < b1; ++b) {
    if (b + kAhead < b1) {
      const int32_t* nx = ids + BagOf(b + kAhead, v) * P;
      for (int64_t p = 0; p < P; ++p) {
        const int32_t r = nx[p];
        if (r >= 0 && r < R) {
          const W* row = table + r * D;
          for (int64_t d = 0; d < D; d += kStep) __builtin_prefetch(row + d, 0, 1);
        }
      }
    }
    const int64_t n = BagOf(b, v);
    const int32_t* bag = ids + n * P;
    float* o = kD ? local : out + n * D;
    bool first = true;
    for (int64_t p = 0; p < P; ++p) {
      const int32_t r = bag[p];
      if (r < 0 || r >= R) continue;
      const W* row = table + static_cast<int64_t>(r) * D;
      if constexpr (kWeighted) {
        const float w = wts[n * P + p];
        if (first) FirstRowW(o, row, w, D);
        else AddRowW(o, row, w, D);
      } else if (first) {
        FirstRow(o, row, D);
      } else {
        AddRow(o, row, D);
      }
      first = false;
    }
    if (first) std::memset(out + n * D, 0, sizeof(float) * D);
    else if (kD) std::memcpy(out + n * D, local, sizeof(float) * D);
  }
}

// PoolBags for D known when compiled where it is one of the usual widths.
template <typename W, bool kWeighted>
void PoolBagsAnyD(const W* t, const int32_t* i, const float* w, float* o, int64_t R, int64_t D,
                  int64_t P, int64_t b0, int64_t b1, Visit v) {
  switch (D) {
    case 16: return PoolBags<W, kWeighted, 16>(t, i, w, o, R, D, P, b0, b1, v);
    case 32: return PoolBags<W, kWeighted, 32>(t, i, w, o, R, D, P, b0, b1, v);
    case 64: return PoolBags<W, kWeighted, 64>(t, i, w, o, R, D, P, b0, b1, v);
    case 128: return PoolBags<W, kWeighted, 128>(t, i, w, o, R, D, P, b0, b1, v);
    default: return PoolBags<W, kWeighted>(t, i, w, o, R, D, P, b0, b1, v);
  }
}

// f(b0, b1) over [0, B) cut into n contiguous ranges; ranges 1.. run on their own
// std::threads, range 0 on the caller's.
template <typename F>
void SplitRange(int64_t B, int64_t n, F f) {
  if (n <= 1) {
    f(int64_t{0}, B);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (B + n - 1) / n;
  for (int64_t k = 1; k < n; ++k) {
    const int64_t b0 = std::min(B, k * per), b1 = std::min(B, (k + 1) * per);
    pool.emplace_back(f, b0, b1);
  }
  f(int64_t{0}, std::min(B, per));
  for (auto& th : pool) th.join();
}

template <typename W>
void Pool(const W* t, const int32_t* i, const float* w, float* o, int64_t R, int64_t D, int64_t B,
          int64_t P, int64_t threads, Visit v) {
  // at least ~16k ids per thread: below that a thread costs more than it saves
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, B * P / 16384));
  if (w == nullptr)
    SplitRange(B, n, [=](int64_t b0, int64_t b1) { PoolBagsAnyD<W, false>(t, i, w, o, R, D, P, b0, b1, v); });
  else
    SplitRange(B, n, [=](int64_t b0, int64_t b1) { PoolBagsAnyD<W, true>(t, i, w, o, R, D, P, b0, b1, v); });
}

ffi::Error PooledLookup(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids, const float* w,
                        ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t threads, int64_t visit) {
  auto td = table.dimensions(), idd = ids.dimensions(), od = out->dimensions();
  const Store store = StoreOf(table.element_type());
  if (store == Store::kBad)
    return ffi::Error::InvalidArgument("table must be f32, bf16 or f16, got data type " +
                                       std::to_string(static_cast<int>(table.element_type())));
  if (td.size() != 2) return ffi::Error::InvalidArgument("table must be [R, D], got " + Dims(td));
  if (idd.size() != 2) return ffi::Error::InvalidArgument("ids must be i32[B, P], got " + Dims(idd));
  const int64_t R = td[0], D = td[1], B = idd[0], P = idd[1];
  if (od.size() != 2 || od[0] != B || od[1] != D)
    return ffi::Error::InvalidArgument("out must be f32[" + std::to_string(B) + "," +
                                       std::to_string(D) + "], got " + Dims(od));
  if (visit < 1 || B % visit != 0)
    return ffi::Error::InvalidArgument("visit must divide the bags " + std::to_string(B) +
                                       ", got " + std::to_string(visit));
  const Visit v{visit, B / visit};
  float* o = out->typed_data();
  if (B == 0 || D == 0) return ffi::Error::Success();
  if (P == 0 || R == 0) {
    std::memset(o, 0, sizeof(float) * B * D);
    return ffi::Error::Success();
  }
  const void* t = table.untyped_data();
  const int32_t* i = ids.typed_data();
  if (store == Store::kF32) Pool(static_cast<const float*>(t), i, w, o, R, D, B, P, threads, v);
  else if (store == Store::kBf16) Pool(static_cast<const Bf16*>(t), i, w, o, R, D, B, P, threads, v);
  else Pool(static_cast<const F16*>(t), i, w, o, R, D, B, P, threads, v);
  return ffi::Error::Success();
}

ffi::Error PooledLookupImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids,
                            ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t threads,
                            int64_t visit) {
  return PooledLookup(table, ids, nullptr, out, threads, visit);
}

// The same with per-sample weights f32[B, P] (one per id position).
ffi::Error WeightedPooledLookupImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids,
                                    ffi::Buffer<ffi::F32> weights,
                                    ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t threads,
                                    int64_t visit) {
  auto idd = ids.dimensions(), wd = weights.dimensions();
  if (wd.size() != idd.size() || (wd.size() == 2 && (wd[0] != idd[0] || wd[1] != idd[1])))
    return ffi::Error::InvalidArgument("weights must have the ids' shape " + Dims(idd) + ", got " +
                                       Dims(wd));
  return PooledLookup(table, ids, weights.typed_data(), out, threads, visit);
}

// ---- Bags packed for their owners ---------------------------------------------
//
// What `jdmt.embeddings.routing.bag_send` computes, straight from the batch's
// table rows (`canon` i32[B, C], -1: no id) in one pass, without the column
// gather, transpose, cumulative sums and scatters of the XLA form. Item (k, b)
// is piece k of sample b; its ids are canon[b, cols[k, p]] for the positions p
// with cols[k, p] >= 0 and a row >= 0, in position order. Peer g's block is
// `[header | ids]`: header slot kd[k] * B + b holds item (k, b)'s id count,
// then the ids (each + base[k], the piece's storage offset) of g's items in
// (k, b) order from slot header[g]; -1 after. Ids past `cap` are dropped
// (sizes[g] = header[g] + g's ids, possibly > cap: the caller reports
// overflow). With weights (wcanon f32[B, C] and weighted[k]), wsend holds each
// id's weight bits at the id's slot (1.0 for the pieces not weighted), 0 in
// the header and after.

struct PackArgs {
  const int32_t* canon;
  const float* wcanon;  // or nullptr
  const int32_t* cols;
  const int32_t* dst;
  const int32_t* kd;
  const int32_t* base;
  const uint8_t* weighted;  // or nullptr
  int64_t B, C, K, P, cap;
};

inline int32_t BagLen(const PackArgs& a, int64_t k, const int32_t* row) {
  int32_t n = 0;
  const int32_t* c = a.cols + k * a.P;
  for (int64_t p = 0; p < a.P; ++p) n += (c[p] >= 0 && row[c[p]] >= 0);
  return n;
}

void PackIds(const PackArgs& a, const int64_t* off, int32_t* send, int32_t* wsend, int64_t b0,
             int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int32_t* row = a.canon + b * a.C;
    const float* wrow = a.wcanon ? a.wcanon + b * a.C : nullptr;
    for (int64_t k = 0; k < a.K; ++k) {
      int64_t pos = off[k * a.B + b];
      int32_t* out = send + a.dst[k] * a.cap;
      int32_t* wout = wsend ? wsend + a.dst[k] * a.cap : nullptr;
      const bool weighted = wout && a.weighted[k];
      const int32_t* c = a.cols + k * a.P;
      for (int64_t p = 0; p < a.P && pos < a.cap; ++p) {
        if (c[p] < 0) continue;
        const int32_t v = row[c[p]];
        if (v < 0) continue;
        out[pos] = v + a.base[k];
        if (wout) {
          const float w = weighted ? wrow[c[p]] : 1.0f;
          std::memcpy(wout + pos, &w, sizeof(float));
        }
        ++pos;
      }
    }
  }
}

ffi::Error BagPack(ffi::Buffer<ffi::S32> canon, const float* wcanon, ffi::Buffer<ffi::S32> cols,
                   ffi::Buffer<ffi::S32> dst, ffi::Buffer<ffi::S32> kd, ffi::Buffer<ffi::S32> base,
                   ffi::Buffer<ffi::S32> header, const uint8_t* weighted,
                   ffi::Result<ffi::Buffer<ffi::S32>> send, ffi::Result<ffi::Buffer<ffi::S32>> sizes,
                   int32_t* wsend, int64_t threads) {
  auto cd = canon.dimensions(), kc = cols.dimensions(), sd = send->dimensions();
  if (cd.size() != 2) return ffi::Error::InvalidArgument("canon must be i32[B, C], got " + Dims(cd));
  if (kc.size() != 2) return ffi::Error::InvalidArgument("cols must be i32[K, P], got " + Dims(kc));
  const int64_t B = cd[0], C = cd[1], K = kc[0], P = kc[1];
  const int64_t G = header.dimensions()[0];
  if (sd.size() != 2 || sd[0] != G) return ffi::Error::InvalidArgument("send must be i32[G, cap], got " + Dims(sd));
  if (dst.element_count() != K || kd.element_count() != K || base.element_count() != K)
    return ffi::Error::InvalidArgument("dst, kd and base must have one entry per piece (" +
                                       std::to_string(K) + ")");
  const int64_t cap = sd[1];
  PackArgs a{canon.typed_data(), wcanon, cols.typed_data(), dst.typed_data(), kd.typed_data(),
             base.typed_data(), weighted, B, C, K, P, cap};
  const int32_t* hd = header.typed_data();
  for (int64_t k = 0; k < K; ++k) {
    if (a.dst[k] < 0 || a.dst[k] >= G) return ffi::Error::InvalidArgument("dst out of range");
    if ((int64_t{a.kd[k]} + 1) * B > hd[a.dst[k]] || hd[a.dst[k]] > cap)
      return ffi::Error::InvalidArgument("a piece's header slots do not fit its peer's header");
    for (int64_t p = 0; p < P; ++p)
      if (a.cols[k * P + p] >= C) return ffi::Error::InvalidArgument("cols out of range");
  }
  int32_t* s = send->typed_data();
  std::fill(s, s + G * cap, -1);
  if (wsend) std::fill(wsend, wsend + G * cap, 0);
  // the ids' counts, written into the headers; then each item's first slot
  std::vector<int64_t> off(static_cast<size_t>(K * B));
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* row = a.canon + b * C;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t n = BagLen(a, k, row);
      off[k * B + b] = n;
      s[a.dst[k] * cap + a.kd[k] * B + b] = n;
    }
  }
  std::vector<int64_t> run(hd, hd + G);
  for (int64_t k = 0; k < K; ++k) {
    int64_t r = run[a.dst[k]];
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = off[k * B + b];
      off[k * B + b] = r;
      r += n;
    }
    run[a.dst[k]] = r;
  }
  int32_t* sz = sizes->typed_data();
  for (int64_t g = 0; g < G; ++g) sz[g] = static_cast<int32_t>(run[g]);
  // at least ~64k ids per thread
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, B * K * P / 65536));
  const int64_t* o = off.data();
  SplitRange(B, n, [=](int64_t b0, int64_t b1) { PackIds(a, o, s, wsend, b0, b1); });
  return ffi::Error::Success();
}

ffi::Error BagPackImpl(ffi::Buffer<ffi::S32> canon, ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> dst,
                       ffi::Buffer<ffi::S32> kd, ffi::Buffer<ffi::S32> base, ffi::Buffer<ffi::S32> header,
                       ffi::Result<ffi::Buffer<ffi::S32>> send, ffi::Result<ffi::Buffer<ffi::S32>> sizes,
                       int64_t threads) {
  return BagPack(canon, nullptr, cols, dst, kd, base, header, nullptr, send, sizes, nullptr, threads);
}

// The same with the ids' weights: wcanon f32[B, C] and weighted u8[K] (1: the
// piece's weights travel; 0: its ids get weight 1).
ffi::Error WeightedBagPackImpl(ffi::Buffer<ffi::S32> canon, ffi::Buffer<ffi::F32> wcanon,
                               ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> dst,
                               ffi::Buffer<ffi::S32> kd, ffi::Buffer<ffi::S32> base,
                               ffi::Buffer<ffi::S32> header, ffi::Buffer<ffi::U8> weighted,
                               ffi::Result<ffi::Buffer<ffi::S32>> send,
                               ffi::Result<ffi::Buffer<ffi::S32>> sizes,
                               ffi::Result<ffi::Buffer<ffi::S32>> wsend, int64_t threads) {
  auto cd = canon.dimensions(), wd = wcanon.dimensions();
  if (wd.size() != 2 || wd[0] != cd[0] || wd[1] != cd[1])
    return ffi::Error::InvalidArgument("wcanon must have canon's shape " + Dims(cd) + ", got " + Dims(wd));
  if (weighted.element_count() != cols.dimensions()[0])
    return ffi::Error::InvalidArgument("weighted must have one entry per piece");
  if (wsend->dimensions().size() != 2 || wsend->element_count() != send->element_count())
    return ffi::Error::InvalidArgument("wsend must have send's shape");
  return BagPack(canon, wcanon.typed_data(), cols, dst, kd, base, header, weighted.typed_data(), send,
                 sizes, wsend->typed_data(), threads);
}

// ---- row requests, de-duplicated per owner ----------------------------------
//
// `routing.send_keys` / `routing.row_send`: each valid id's key (owner *
// rows_per_peer + local storage row; -1: no id) is sorted with its position
// (LSD radix on the key's bits, the position riding in the low bits; stable),
// and one walk numbers the unique keys per owner in ascending order: the
// r-th unique row asked of peer g goes to send[g, r] when r < cap; sizes[g]
// counts them all (overflow shows as sizes > cap); inv[i] is where id i's row
// comes back (g * cap + r, or -1: no id or past the capacity). The same
// outputs as the XLA functions, bit for bit, in O(ids) work instead of a sort
// and a binary search per id.

template <typename KeyOf>
ffi::Error RowSendCore(int64_t n, KeyOf key_of, int64_t rpp, ffi::Result<ffi::Buffer<ffi::S32>>& send,
                       ffi::Result<ffi::Buffer<ffi::S32>>& sizes, ffi::Result<ffi::Buffer<ffi::S32>>& inv,
                       ffi::Result<ffi::Buffer<ffi::S32>>& unique) {
  auto sd = send->dimensions();
  if (sd.size() != 2) return ffi::Error::InvalidArgument("send must be i32[G, cap], got " + Dims(sd));
  const int64_t G = sd[0], cap = sd[1];
  if (sizes->element_count() != G) return ffi::Error::InvalidArgument("sizes must be i32[G]");
  if (inv->element_count() != n) return ffi::Error::InvalidArgument("inv must have one entry per id");
  if (rpp <= 0) return ffi::Error::InvalidArgument("rows_per_peer must be > 0");
  int32_t* s = send->typed_data();
  int32_t* iv = inv->typed_data();
  std::fill(s, s + G * cap, -1);
  std::vector<int64_t> key(static_cast<size_t>(n));
  int64_t m = 0, kmax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = key_of(i);
    if (k >= G * rpp) return ffi::Error::InvalidArgument("a row's owner is not a peer");
    key[i] = k;
    iv[i] = -1;
    if (k >= 0) {
      ++m;
      kmax = std::max(kmax, k);
    }
  }
  const int pbits = BitsFor(static_cast<uint64_t>(std::max<int64_t>(n - 1, 0)));
  const int kbits = BitsFor(static_cast<uint64_t>(kmax));
  // packed: an item is (key << pbits) | position; else just the position
  const bool packed = kbits + pbits <= 64;
  std::vector<uint64_t> a(static_cast<size_t>(m)), b(static_cast<size_t>(m));
  for (int64_t i = 0, j = 0; i < n; ++i)
    if (key[i] >= 0) a[j++] = packed ? (static_cast<uint64_t>(key[i]) << pbits) | uint64_t(i) : uint64_t(i);
  const uint64_t* srt = a.data();
  std::vector<uint32_t> hist;
  if (packed) {
    srt = RadixSort<uint64_t>(a.data(), b.data(), m, pbits, kbits, hist);
  } else {  // keys too wide to pack with positions: sort positions by key (stable)
    std::stable_sort(a.begin(), a.end(), [&](uint64_t x, uint64_t y) { return key[x] < key[y]; });
  }
  const uint64_t pmask = pbits >= 64 ? ~uint64_t{0} : (uint64_t{1} << pbits) - 1;
  std::vector<int64_t> count(static_cast<size_t>(G), 0);
  int64_t prev = -1, back = -1, uniq = 0;
  for (int64_t j = 0; j < m; ++j) {
    const uint64_t it = srt[j];
    const int64_t pos = packed ? static_cast<int64_t>(it & pmask) : static_cast<int64_t>(it);
    const int64_t k = packed ? static_cast<int64_t>(it >> pbits) : key[pos];  // no random read when packed
    if (k != prev) {
      const int64_t g = k / rpp, r = count[g]++;
      back = r < cap ? g * cap + r : -1;
      if (back >= 0) s[back] = static_cast<int32_t>(k % rpp);
      ++uniq;
      prev = k;
    }
    iv[pos] = static_cast<int32_t>(back);
  }
  int32_t* sz = sizes->typed_data();
  for (int64_t g = 0; g < G; ++g) sz[g] = static_cast<int32_t>(count[g]);
  unique->typed_data()[0] = static_cast<int32_t>(uniq);
  return ffi::Error::Success();
}

ffi::Error SendKeysImpl(ffi::Buffer<ffi::S32> key, ffi::Result<ffi::Buffer<ffi::S32>> send,
                        ffi::Result<ffi::Buffer<ffi::S32>> sizes, ffi::Result<ffi::Buffer<ffi::S32>> inv,
                        ffi::Result<ffi::Buffer<ffi::S32>> unique, int64_t rows_per_peer) {
  const int32_t* k = key.typed_data();
  return RowSendCore(key.element_count(), [k](int64_t i) { return k[i] < 0 ? int64_t{-1} : int64_t{k[i]}; },
                     rows_per_peer, send, sizes, inv, unique);
}

ffi::Error RowSendImpl(ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> piece, ffi::Buffer<ffi::S32> stride,
                       ffi::Buffer<ffi::S32> devices, ffi::Buffer<ffi::S32> offsets,
                       ffi::Result<ffi::Buffer<ffi::S32>> send, ffi::Result<ffi::Buffer<ffi::S32>> sizes,
                       ffi::Result<ffi::Buffer<ffi::S32>> inv, ffi::Result<ffi::Buffer<ffi::S32>> unique,
                       int64_t rows_per_peer) {
  auto dd = devices.dimensions();
  const int64_t n = rows.element_count(), K = stride.element_count();
  if (piece.element_count() != n) return ffi::Error::InvalidArgument("piece must have one entry per id");
  if (dd.size() != 2 || dd[0] != K || offsets.element_count() != devices.element_count())
    return ffi::Error::InvalidArgument("devices and offsets must be i32[K, S], got " + Dims(dd));
  const int64_t S = dd[1];
  const int32_t *r = rows.typed_data(), *pc = piece.typed_data(), *st = stride.typed_data(),
                *dv = devices.typed_data(), *of = offsets.typed_data();
  for (int64_t k = 0; k < K; ++k)
    if (st[k] < 1 || st[k] > S) return ffi::Error::InvalidArgument("a piece's stride is out of range");
  for (int64_t i = 0; i < n; ++i)
    if (r[i] >= 0 && (pc[i] < 0 || pc[i] >= K)) return ffi::Error::InvalidArgument("piece out of range");
  const int64_t rpp = rows_per_peer;
  return RowSendCore(
      n,
      [=](int64_t i) {
        if (r[i] < 0) return int64_t{-1};
        const int64_t p = pc[i], k = st[p], sh = r[i] % k;
        return int64_t{dv[p * S + sh]} * rpp + of[p * S + sh] + r[i] / k;
      },
      rpp, send, sizes, inv, unique);
}

// ---- DLRM dot interaction ---------------------------------------------------
//
// Forward: t f32[B, N, D] -> z f32[B, N(N-1)/2], z[b, p(i, j)] = <t_bi, t_bj>
// for i < j in row-major order (`jdmt.models.dlrm.dot_interaction`). Each
// sum runs over d in ascending order, vectorised across j: rows of t are
// multiplied into the transposed t of the sample, so no horizontal sums are
// needed. Backward: g f32[B, P] -> dt f32[B, N, D], dt_bi = sum_{j != i}
// g[b, p(min, max)] t_bj, summed over j in ascending order, vectorised across
// d. Samples are independent, so threads split them without changing a bit.
//
// Both run with floating-point contraction on (a multiply and an add become
// one FMA where the ISA has it; the rest of the library keeps
// -ffp-contract=off): the interaction is compared with XLA to f32 rounding,
// never bit for bit, and FMA doubles the arithmetic rate.
#if defined(__clang__)
#define JDMT_FP_CONTRACT _Pragma("clang fp contract(fast)")
#else
#define JDMT_FP_CONTRACT
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif

// Register tiles: kRows rows of t against kCols floats (whole vectors) of the
// other operand, every loop of a fixed length so the accumulators stay in
// registers (32 vector registers with AVX-512, 16 otherwise).
#if defined(__AVX512F__)
constexpr int64_t kTileRows = 6, kTileCols = 32;
#else
constexpr int64_t kTileRows = 4, kTileCols = 16;
#endif

// acc[r][0:W] = sum_d a[r][d * sa] * v[d * sv + 0:W], d ascending; W a multiple
// of the lanes (the caller pads), sa / sv the strides of d.
template <int64_t W>
inline void TileDot(const float* const* a, int64_t sa, const float* v, int64_t sv, int64_t D,
                    float (&acc)[kTileRows][kTileCols]) {
  JDMT_FP_CONTRACT
  float c[kTileRows][W];
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int64_t k = 0; k < W; ++k) c[r][k] = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float* x = v + d * sv;
    for (int64_t r = 0; r < kTileRows; ++r) {
      const float s = a[r][d * sa];
      for (int64_t k = 0; k < W; ++k) c[r][k] += s * x[k];
    }
  }
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int64_t k = 0; k < W; ++k) acc[r][k] = c[r][k];
}

void InteractFwd(const float* t, float* z, int64_t N, int64_t D, int64_t b0, int64_t b1) {
  // The sample's t transposed to [D, Np] (Np: N rounded up to the tile's
  // columns, zero padded); row blocks of t against column tiles of the
  // transpose, only those that reach the strict upper triangle.
  constexpr int64_t kHalf = kTileCols / 2;
  const int64_t P = N * (N - 1) / 2, Np = (N + kTileCols - 1) / kTileCols * kTileCols;
  std::vector<float> tt(static_cast<size_t>(D * Np), 0.0f), full(static_cast<size_t>(N * Np));
  float acc[kTileRows][kTileCols];
  for (int64_t b = b0; b < b1; ++b) {
    const float* tb = t + b * N * D;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t d = 0; d < D; ++d) tt[d * Np + i] = tb[i * D + d];
    for (int64_t i0 = 0; i0 + 1 < N; i0 += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, N - i0);
      const float* ti[kTileRows];  // rows past N repeat the last one (their sums are dropped)
      for (int64_t r = 0; r < kTileRows; ++r) ti[r] = tb + std::min<int64_t>(i0 + r, N - 1) * D;
      int64_t c = (i0 + 1) / kHalf * kHalf;
      while (c < Np) {
        const int64_t w = (c % kTileCols == 0) ? kTileCols : kHalf;  // a half tile up to the next whole one
        if (w == kTileCols) TileDot<kTileCols>(ti, 1, tt.data() + c, Np, D, acc);
        else TileDot<kHalf>(ti, 1, tt.data() + c, Np, D, acc);
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(full.data() + (i0 + r) * Np + c, acc[r], sizeof(float) * w);
        c += w;
      }
    }
    float* o = z + b * P;
    for (int64_t i = 0; i + 1 < N; ++i) {  // the strict upper triangle, row by row
      std::memcpy(o, full.data() + i * Np + i + 1, sizeof(float) * (N - i - 1));
      o += N - i - 1;
    }
  }
}

void InteractBwd(const float* t, const float* g, float* dt, int64_t N, int64_t D, int64_t b0,
                 int64_t b1) {
  // dt = G t per sample (G the symmetric N x N matrix of g, zero diagonal):
  // row blocks of G against column tiles of t (D padded to whole tiles).
  const int64_t P = N * (N - 1) / 2, Dp = (D + kTileCols - 1) / kTileCols * kTileCols;
  const int64_t Nr = (N + kTileRows - 1) / kTileRows * kTileRows;
  std::vector<float> G(static_cast<size_t>(Nr * N), 0.0f), tp(static_cast<size_t>(N * Dp), 0.0f);
  float acc[kTileRows][kTileCols];
  for (int64_t b = b0; b < b1; ++b) {
    const float* gb = g + b * P;
    int64_t p = 0;
    for (int64_t i = 0; i < N; ++i) {
      G[i * N + i] = 0.0f;
      for (int64_t j = i + 1; j < N; ++j, ++p) G[i * N + j] = G[j * N + i] = gb[p];
    }
    const float* tb = t + b * N * D;
    const float* src = tb;
    if (Dp != D) {  // rows padded to whole tiles
      for (int64_t j = 0; j < N; ++j) std::memcpy(tp.data() + j * Dp, tb + j * D, sizeof(float) * D);
      src = tp.data();
    }
    for (int64_t i0 = 0; i0 < N; i0 += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, N - i0);
      const float* gi[kTileRows];  // rows past N are G's zero padding
      for (int64_t r = 0; r < kTileRows; ++r) gi[r] = G.data() + (i0 + r) * N;
      for (int64_t c = 0; c < D; c += kTileCols) {
        TileDot<kTileCols>(gi, 1, src + c, Dp, N, acc);
        const int64_t w = std::min<int64_t>(kTileCols, D - c);
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(dt + (b * N + i0 + r) * D + c, acc[r], sizeof(float) * w);
      }
    }
  }
}

#if !defined(__clang__)
#pragma GCC pop_options
#endif

template <typename F>
void SplitSamples(int64_t B, int64_t work_per_sample, int64_t threads, F f) {
  // at least ~2M multiply-adds per thread: below that a thread costs more than it saves
  SplitRange(B, std::max<int64_t>(1, std::min<int64_t>(threads, B * work_per_sample / (int64_t{1} << 21))),
             f);
}

ffi::Error InteractionImpl(ffi::Buffer<ffi::F32> t, ffi::Result<ffi::Buffer<ffi::F32>> z,
                           int64_t threads) {
  auto td = t.dimensions(), zd = z->dimensions();
  if (td.size() != 3) return ffi::Error::InvalidArgument("t must be f32[B, N, D], got " + Dims(td));
  const int64_t B = td[0], N = td[1], D = td[2], P = N * (N - 1) / 2;
  if (zd.size() != 2 || zd[0] != B || zd[1] != P)
    return ffi::Error::InvalidArgument("z must be f32[" + std::to_string(B) + "," + std::to_string(P) +
                                       "], got " + Dims(zd));
  if (B == 0 || P == 0) return ffi::Error::Success();
  if (D == 0) {
    std::memset(z->typed_data(), 0, sizeof(float) * B * P);
    return ffi::Error::Success();
  }
  const float* tp = t.typed_data();
  float* zp = z->typed_data();
  SplitSamples(B, P * D, threads, [=](int64_t b0, int64_t b1) { InteractFwd(tp, zp, N, D, b0, b1); });
  return ffi::Error::Success();
}

ffi::Error InteractionGradImpl(ffi::Buffer<ffi::F32> t, ffi::Buffer<ffi::F32> g,
                               ffi::Result<ffi::Buffer<ffi::F32>> dt, int64_t threads) {
  auto td = t.dimensions(), gd = g.dimensions(), od = dt->dimensions();
  if (td.size() != 3) return ffi::Error::InvalidArgument("t must be f32[B, N, D], got " + Dims(td));
  const int64_t B = td[0], N = td[1], D = td[2], P = N * (N - 1) / 2;
  if (gd.size() != 2 || gd[0] != B || gd[1] != P)
    return ffi::Error::InvalidArgument("g must be f32[" + std::to_string(B) + "," + std::to_string(P) +
                                       "], got " + Dims(gd));
  if (od.size() != 3 || od[0] != B || od[1] != N || od[2] != D)
    return ffi::Error::InvalidArgument("dt must have t's shape, got " + Dims(od));
  if (B == 0 || N == 0 || D == 0) return ffi::Error::Success();
  const float* tp = t.typed_data();
  const float* gp = g.typed_data();
  float* op = dt->typed_data();
  SplitSamples(B, N * N * D, threads,
               [=](int64_t b0, int64_t b1) { InteractBwd(tp, gp, op, N, D, b0, b1); });
  return ffi::Error::Success();
}

}  // namespace

// Exported (the library is built with -fvisibility=hidden).
#define JDMT_EXPORT __attribute__((visibility("default")))
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtSparseUpdate(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtSparseUpdateSgd(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtPooledLookup(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtWeightedPooledLookup(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtDotInteraction(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtDotInteractionGrad(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtBagPack(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtWeightedBagPack(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtSendKeys(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtRowSend(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtSparseUpdate, UpdateImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // table: f32, bf16, f16
                                  .Arg<ffi::Buffer<ffi::F32>>()  // accum
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [K, n] or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seed (16-bit tables)
                                  .Ret<ffi::AnyBuffer>()         // table (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // accum (aliased)
                                  .Attr<int32_t>("kind")
                                  .Attr<float>("eps")
                                  .Attr<float>("dim")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtSparseUpdateSgd, SgdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // table: f32, bf16, f16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [K, n] or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seed (16-bit tables)
                                  .Ret<ffi::AnyBuffer>()         // table (aliased)
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtPooledLookup, PooledLookupImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // table: f32, bf16, f16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [B, P]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, D]
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("visit"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtWeightedPooledLookup, WeightedPooledLookupImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // table: f32, bf16, f16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [B, P]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights [B, P]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, D]
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("visit"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtDotInteraction, InteractionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t [B, N, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // z [B, N(N-1)/2]
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtDotInteractionGrad, InteractionGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t [B, N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g [B, N(N-1)/2]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dt [B, N, D]
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtBagPack, BagPackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // canon [B, C]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cols [K, P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dst [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kd [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // base [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // header [G]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // send [G, cap]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sizes [G]
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtWeightedBagPack, WeightedBagPackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // canon [B, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wcanon [B, C]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cols [K, P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dst [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kd [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // base [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // header [G]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // weighted [K]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // send [G, cap]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sizes [G]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // wsend [G, cap]
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtSendKeys, SendKeysImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // key [n] (-1: none)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // send [G, cap]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sizes [G]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // inv [n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // unique []
                                  .Attr<int64_t>("rows_per_peer"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtRowSend, RowSendImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows [n] (-1: none)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // piece [n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // stride [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // devices [K, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // offsets [K, S]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // send [G, cap]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sizes [G]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // inv [n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // unique []
                                  .Attr<int64_t>("rows_per_peer"));

// Lets the loader check the library matches the Python side.
extern "C" JDMT_EXPORT int jdmt_cpu_kernels_abi_version() { return 11; }
