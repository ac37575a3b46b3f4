// Fused sparse optimizer step of one device's local table shard, and the
// pooled lookup of its bags (XLA FFI, CPU; the lookup is at the end).
//
// Same meaning as `jdmt.embeddings.optimizers.sparse_step`: for each slot k
// (a storage buffer's ids), every id of the slot is sorted by row (stable, so
// the occurrences of a row stay in ascending position order), the gradients of
// a row's occurrences (row src[j] of grads for id j) are summed in that order
// into a D-float buffer, and the optimizer is applied to the row once:
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
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int32_t { kRowwiseAdagrad = 0, kAdagrad = 1, kSgd = 2 };

struct Problem {
  float* table;        // [R, D]
  float* accum;        // [R] (row-wise), [R, D] (Adagrad), null (SGD)
  const int32_t* ids;  // [K, n]
  const int32_t* src;  // [K, n] gradient row of each id, in [0, G)
  const float* grads;  // [K, G, D]
  int64_t R, D, K, n, G;
  float lr, eps, inv_dim;
  int32_t kind;
};

struct Scratch {
  std::vector<uint64_t> a, b;  // sort buffers (uint32 items use the first half)
  std::vector<float> acc;
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

// Apply the optimizer to one row with its summed gradient `g`.
inline void ApplyRow(const Problem& p, int64_t row, const float* g) {
  const int64_t D = p.D;
  float* w = p.table + row * D;
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

// Walk the sorted items: for each run of equal rows, sum the run's gradients
// (in position order) and apply the optimizer to the row once. The runs are
// found first, so the table rows of the next few unique rows can be
// prefetched (they are mostly cache misses: one row per page of the table).
template <typename T>
void Walk(const Problem& p, int64_t k, const T* srt, int64_t m, int pbits, int64_t lo,
          Scratch& s) {
  const int64_t D = p.D;
  const T pmask = (static_cast<T>(1) << pbits) - 1;
  const float* gk = p.grads + k * p.G * D;
  float* acc = s.acc.data();
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
  const int64_t rbytes = D * 4;
  auto row_of = [&](int64_t u) { return lo + static_cast<int64_t>(srt[start[u]] >> pbits); };
  auto grad_of = [&](int64_t i) { return gk + static_cast<int64_t>(srt[i] & pmask) * D; };
  for (int64_t u = 0; u < std::min<int64_t>(U, kAheadRow); ++u) Prefetch(p.table + row_of(u) * D, rbytes);
  for (int64_t i = 0; i < std::min<int64_t>(m, kAheadGrad); ++i) Prefetch(grad_of(i), rbytes);
  for (int64_t u = 0; u < U; ++u) {
    if (u + kAheadRow < U) {
      const int64_t nr = row_of(u + kAheadRow);
      Prefetch(p.table + nr * D, rbytes);
      if (p.kind == kAdagrad) Prefetch(p.accum + nr * D, rbytes);
      else if (p.kind == kRowwiseAdagrad) __builtin_prefetch(p.accum + nr, 1, 3);
    }
    const int64_t b = start[u], e = start[u + 1];
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
    ApplyRow(p, row_of(u), acc);
  }
}

// Items (row - lo) << pbits | gradient row of the valid ids of a slot, in position order.
template <typename T>
void Pack(const int32_t* ids, const int32_t* src, int64_t n, int64_t R, int64_t G, int64_t lo,
          int pbits, T* a) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    const int64_t g = src[i];
    if (id >= 0 && id < R && g >= 0 && g < G)
      a[c++] = (static_cast<T>(id - lo) << pbits) | static_cast<T>(g);
  }
}

template <typename T>
void SortWalk(const Problem& p, int64_t k, T* a, T* b, int64_t m, int pbits, int rbits,
              int64_t lo, Scratch& s) {
  if (m == 0) return;  // (Walk assumes at least one item)
  const T* srt = RadixSort<T>(a, b, m, pbits, rbits, s.hist);
  Walk<T>(p, k, srt, m, pbits, lo, s);
}

// One slot over nt threads: the items are split by row range into nt stable
// partitions (a -> b; a row's occurrences stay in position order), and each
// thread sorts and walks its own partition (the row ranges are disjoint, so
// no two threads touch a row). The same bits as one thread.
template <typename T>
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
    scratch[t].acc.resize(std::max<int64_t>(p.D, 1));
    SortWalk<T>(p, k, b + off[t], a + off[t], off[t + 1] - off[t], pbits, rbits, lo, scratch[t]);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < nt; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

// Below this many ids a slot is not split over threads.
constexpr int64_t kMinIdsToSplit = 32768;

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
  const int pbits = BitsFor(static_cast<uint64_t>(p.G - 1));
  const int rbits = BitsFor(static_cast<uint64_t>(hi - lo));
  if (static_cast<size_t>(n) > s.a.size()) {
    s.a.resize(n);
    s.b.resize(n);
  }
  const bool split = nt > 1 && m >= kMinIdsToSplit;
  if (pbits + rbits <= 32) {
    uint32_t* a = reinterpret_cast<uint32_t*>(s.a.data());
    uint32_t* b = reinterpret_cast<uint32_t*>(s.b.data());
    Pack<uint32_t>(ids, src, n, R, p.G, lo, pbits, a);
    if (split) SortWalkThreaded<uint32_t>(p, k, a, b, m, pbits, rbits, lo, nt);
    else SortWalk<uint32_t>(p, k, a, b, m, pbits, rbits, lo, s);
  } else {
    uint64_t* a = s.a.data();
    uint64_t* b = s.b.data();
    Pack<uint64_t>(ids, src, n, R, p.G, lo, pbits, a);
    if (split) SortWalkThreaded<uint64_t>(p, k, a, b, m, pbits, rbits, lo, nt);
    else SortWalk<uint64_t>(p, k, a, b, m, pbits, rbits, lo, s);
  }
}

void Run(const Problem& p, int64_t threads) {
  threads = std::max<int64_t>(1, threads);
  if (threads > p.K) {  // fewer slots than threads: each slot split over the threads
    Scratch s;
    s.acc.resize(std::max<int64_t>(p.D, 1));
    for (int64_t k = 0; k < p.K; ++k) Slot(p, k, s, threads);
    return;
  }
  auto work = [&p](int64_t t, int64_t nt) {
    Scratch s;
    s.acc.resize(std::max<int64_t>(p.D, 1));
    for (int64_t k = t; k < p.K; k += nt) Slot(p, k, s);
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

ffi::Error Impl(int32_t kind, ffi::Buffer<ffi::F32> table, float* accum_in, float* accum_out,
                ffi::Span<const int64_t> accum_dims, size_t accum_bytes,
                ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> src,
                ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> lr,
                ffi::Result<ffi::Buffer<ffi::F32>> table_out, float eps, float dim,
                int64_t threads) {
  auto td = table.dimensions(), idd = ids.dimensions(), sd = src.dimensions(),
       gd = grads.dimensions();
  if (td.size() != 2) return ffi::Error::InvalidArgument("table must be f32[R, D], got " + Dims(td));
  const int64_t R = td[0], D = td[1];
  if (idd.size() != 2) return ffi::Error::InvalidArgument("ids must be i32[K, n], got " + Dims(idd));
  const int64_t K = idd[0], n = idd[1];
  if (sd.size() != 2 || sd[0] != K || sd[1] != n)
    return ffi::Error::InvalidArgument("src must be i32[K, n] like ids " + Dims(idd) + ", got " + Dims(sd));
  if (gd.size() != 3 || gd[0] != K || gd[2] != D)
    return ffi::Error::InvalidArgument("grads must be f32[K, G, D], got " + Dims(gd) +
                                       " for ids " + Dims(idd) + ", table " + Dims(td));
  const int64_t G = gd[1];
  if (lr.element_count() != 1) return ffi::Error::InvalidArgument("lr must be a scalar");
  if (kind == kRowwiseAdagrad) {
    if (accum_dims.size() != 1 || accum_dims[0] != R)
      return ffi::Error::InvalidArgument("row-wise Adagrad accum must be f32[R], got " + Dims(accum_dims));
  } else if (kind == kAdagrad) {
    if (accum_dims.size() != 2 || accum_dims[0] != R || accum_dims[1] != D)
      return ffi::Error::InvalidArgument("Adagrad accum must be f32[R, D], got " + Dims(accum_dims));
  } else if (kind != kSgd) {
    return ffi::Error::InvalidArgument("unknown optimizer kind " + std::to_string(kind));
  }
  float* t = table_out->typed_data();
  if (t != table.typed_data()) std::memcpy(t, table.typed_data(), table.size_bytes());
  if (accum_out != nullptr && accum_out != accum_in) std::memcpy(accum_out, accum_in, accum_bytes);
  if (K == 0 || n == 0 || R == 0 || D == 0 || G == 0) return ffi::Error::Success();
  Problem p;
  p.table = t;
  p.accum = kind == kSgd ? nullptr : accum_out;
  p.ids = ids.typed_data();
  p.src = src.typed_data();
  p.grads = grads.typed_data();
  p.R = R; p.D = D; p.K = K; p.n = n; p.G = G;
  p.lr = lr.typed_data()[0];
  p.eps = eps;
  p.inv_dim = 1.0f / (dim > 0 ? dim : static_cast<float>(D));
  p.kind = kind;
  Run(p, threads);
  return ffi::Error::Success();
}

ffi::Error UpdateImpl(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> accum,
                      ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> src,
                      ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::F32> lr,
                      ffi::Result<ffi::Buffer<ffi::F32>> table_out,
                      ffi::Result<ffi::Buffer<ffi::F32>> accum_out, int32_t kind, float eps,
                      float dim, int64_t threads) {
  if (kind == kSgd) return ffi::Error::InvalidArgument("use jdmt_sparse_update_sgd for SGD");
  if (accum_out->element_count() != accum.element_count())
    return ffi::Error::InvalidArgument("accum output shape differs from input");
  return Impl(kind, table, accum.typed_data(), accum_out->typed_data(), accum.dimensions(),
              accum.size_bytes(), ids, src, grads, lr, table_out, eps, dim, threads);
}

ffi::Error SgdImpl(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> ids,
                   ffi::Buffer<ffi::S32> src, ffi::Buffer<ffi::F32> grads,
                   ffi::Buffer<ffi::F32> lr, ffi::Result<ffi::Buffer<ffi::F32>> table_out,
                   int64_t threads) {
  return Impl(kSgd, table, nullptr, nullptr, {}, 0, ids, src, grads, lr, table_out, 0.0f, 0.0f,
              threads);
}

// ---------------------------------------------------------------- pooled lookup
//
// out[b] = sum over p of table[ids[b, p]], positions in ascending order, ids
// outside [0, R) skipped (a bag with none is zeros). The same sum, in the same
// order, as `routing.pool_rows` (its first valid row, then one row added after
// another), so results are bit-identical to the XLA path (up to the sign of a
// zero). The next bag's rows are prefetched while one bag is summed (they are
// mostly cache and TLB misses); bags are split over `threads` std::threads.

void PoolBags(const float* table, const int32_t* ids, float* out, int64_t R, int64_t D,
              int64_t P, int64_t b0, int64_t b1) {
  constexpr int64_t kAhead = 2;  // bags prefetched ahead
  for (int64_t b = b0; b < b1; ++b) {
    if (b + kAhead < b1) {
      const int32_t* nx = ids + (b + kAhead) * P;
      for (int64_t p = 0; p < P; ++p) {
        const int32_t r = nx[p];
        if (r >= 0 && r < R) {
          const float* row = table + r * D;
          for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(row + d, 0, 1);
        }
      }
    }
    const int32_t* bag = ids + b * P;
    float* o = out + b * D;
    bool first = true;
    for (int64_t p = 0; p < P; ++p) {
      const int32_t r = bag[p];
      if (r < 0 || r >= R) continue;
      const float* row = table + static_cast<int64_t>(r) * D;
      if (first) {
        std::memcpy(o, row, sizeof(float) * D);
        first = false;
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] += row[d];
      }
    }
    if (first) std::memset(o, 0, sizeof(float) * D);
  }
}

ffi::Error PooledLookupImpl(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> ids,
                            ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t threads) {
  auto td = table.dimensions(), idd = ids.dimensions(), od = out->dimensions();
  if (td.size() != 2) return ffi::Error::InvalidArgument("table must be f32[R, D], got " + Dims(td));
  if (idd.size() != 2) return ffi::Error::InvalidArgument("ids must be i32[B, P], got " + Dims(idd));
  const int64_t R = td[0], D = td[1], B = idd[0], P = idd[1];
  if (od.size() != 2 || od[0] != B || od[1] != D)
    return ffi::Error::InvalidArgument("out must be f32[" + std::to_string(B) + "," +
                                       std::to_string(D) + "], got " + Dims(od));
  float* o = out->typed_data();
  if (B == 0 || D == 0) return ffi::Error::Success();
  if (P == 0 || R == 0) {
    std::memset(o, 0, sizeof(float) * B * D);
    return ffi::Error::Success();
  }
  const float* t = table.typed_data();
  const int32_t* i = ids.typed_data();
  // at least ~16k ids per thread: below that a thread costs more than it saves
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, B * P / 16384));
  if (n == 1) {
    PoolBags(t, i, o, R, D, P, 0, B);
    return ffi::Error::Success();
  }
  std::vector<std::thread> pool;
  const int64_t per = (B + n - 1) / n;
  for (int64_t k = 1; k < n; ++k) {
    const int64_t b0 = std::min(B, k * per), b1 = std::min(B, (k + 1) * per);
    pool.emplace_back(PoolBags, t, i, o, R, D, P, b0, b1);
  }
  PoolBags(t, i, o, R, D, P, 0, std::min(B, per));
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

}  // namespace

// Exported (the library is built with -fvisibility=hidden).
#define JDMT_EXPORT __attribute__((visibility("default")))
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtSparseUpdate(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtSparseUpdateSgd(XLA_FFI_CallFrame* call_frame);
extern "C" JDMT_EXPORT XLA_FFI_Error* JdmtPooledLookup(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtSparseUpdate, UpdateImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table
                                  .Arg<ffi::Buffer<ffi::F32>>()  // accum
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr
                                  .Ret<ffi::Buffer<ffi::F32>>()  // table (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // accum (aliased)
                                  .Attr<int32_t>("kind")
                                  .Attr<float>("eps")
                                  .Attr<float>("dim")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtSparseUpdateSgd, SgdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr
                                  .Ret<ffi::Buffer<ffi::F32>>()  // table (aliased)
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdmtPooledLookup, PooledLookupImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [B, P]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, D]
                                  .Attr<int64_t>("threads"));

// Lets the loader check the library matches the Python side.
extern "C" JDMT_EXPORT int jdmt_cpu_kernels_abi_version() { return 3; }
