// The softmax attention of mfattn fused for the CPU: forward and closed-form
// backward (docs/theory.md, sections 1, 4 and 8), as XLA FFI handlers.
//
// Notation as in mfattn/_kernels/_softmax.py: scores s_ij = beta <q_i, k_j> + b_ij
// (b_ij = -rate |qpos_i - kpos_j|, the ALiBi bias, when enabled), density
// A_ij = exp(s_ij - lse_i) over the visible keys, output o_i = sum_j w_j A_ij v_j,
// and for cotangents c_i, delta_i = <c_i, o_i> (given), query weights u_i:
//
//   dS_ij = A_ij (<c_i, v_j> - delta_i)
//   dqb_i = sum_j w_j dS_ij k_j          (dq_i / beta)
//   dk_j  = beta sum_i u_i dS_ij q_i
//   dv_j  = sum_i u_i A_ij c_i
//   ds_j  = sum_i u_i dS_ij
//
// Layout: q (G, m, kd), k (G, n, kd), v (G, n, kv), lse and delta (G, m), the
// heads of every sample flattened into G groups. The per-sample inputs (w (n,),
// beta, positions, rate, u (m,)) come once or once per sample (a vmapped call
// broadcasts them): group g reads sample g / (G / count). Work is split over
// (group, block of queries) items with OpenMP; the key-side sums of a group
// split into several blocks are reduced in a fixed order, so the result does not
// depend on the number of threads. Each row runs over the keys stored
// transposed (kd x n) in vectors of keys (GCC/Clang vector extensions), with a
// branch-free polynomial exp: Cephes' expf in float32 (about 1 ulp), a Taylor
// polynomial of degree 13 in float64 (a few ulp).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Flags : int32_t { kCausal = 1, kStrict = 2, kAlibi = 4 };

// --------------------------------------------------------------- vectors
//
// GCC/Clang vector extensions of 64 bytes (16 floats or 8 doubles): one
// AVX-512 register, two AVX2 or four SSE/NEON registers, as the target has.
// Loads and stores go through memcpy (unaligned moves).

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

template <typename T>
using V = typename Simd<T>::V;

template <typename T>
inline V<T> splat(T x) {
  return V<T>{} + x;
}
template <typename T>
inline V<T> load(const T* p) {
  V<T> r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
template <typename T>
inline void store(T* p, V<T> x) {
  std::memcpy(p, &x, sizeof(x));
}
template <typename T>
inline T hsum(V<T> x) {
  T a = T(0);
  for (int l = 0; l < Simd<T>::W; ++l) a += x[l];
  return a;
}
template <typename T>
inline T hmax(V<T> x) {
  T a = x[0];
  for (int l = 1; l < Simd<T>::W; ++l) a = std::max(a, x[l]);
  return a;
}
template <typename T>
inline V<T> vmax(V<T> a, V<T> b) {
  return a > b ? a : b;
}
template <typename T>
inline V<T> vmin(V<T> a, V<T> b) {
  return a < b ? a : b;
}

// ------------------------------------------------------------------- exp
//
// exp(x) = 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2, n rounded to nearest by the
// 1.5 * 2^(mantissa bits) trick; the input is clamped to the normal range
// (the callers mask what must be exactly 0). float32: Cephes' expf polynomial
// (about 1 ulp); float64: Taylor to degree 13 (truncation below 1e-17).

inline V<float> vexp(V<float> x) {
  typedef Simd<float>::I I;
  x = vmin<float>(vmax<float>(x, splat(-87.0f)), splat(88.0f));
  V<float> n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V<float> r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V<float> p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I bits = (__builtin_convertvector(n, I) + 127) << 23;
  return p * reinterpret_cast<V<float>&>(bits);
}

inline V<double> vexp(V<double> x) {
  typedef Simd<double>::I I;
  x = vmin<double>(vmax<double>(x, splat(-708.0)), splat(709.0));
  V<double> n = (x * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;
  V<double> r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  V<double> p = splat(1.0 / 6227020800.0);  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  I bits = (__builtin_convertvector(n, I) + 1023) << 52;
  return p * reinterpret_cast<V<double>&>(bits);
}

template <typename T>
constexpr T density_cap() {
  // as _softmax.density: a quarter of the log of the largest finite number
  return std::is_same<T, float>::value ? T(22.18070977791825) : T(177.4456782233459);
}

// ------------------------------------------------------ per-sample inputs

template <typename T>
struct PerSample {
  const T* data;
  int64_t per;    // elements per sample
  int64_t every;  // groups per sample
  const T* at(int64_t g) const { return data + (g / every) * per; }
};

template <typename T>
PerSample<T> per_sample(const T* data, size_t size, int64_t per, int64_t groups) {
  int64_t count = per > 0 ? static_cast<int64_t>(size) / per : 1;
  count = std::max<int64_t>(count, 1);
  return PerSample<T>{data, per, std::max<int64_t>(groups / count, 1)};
}

// One group's keys, values, weights and key positions, transposed and padded
// to a whole number of vectors (padding keys: weight 0, key and value 0, so
// that they enter no sum and produce no NaN; their key-side sums are dropped).
template <typename T>
struct Group {
  int64_t kd, kv, n, np;
  std::vector<T> kt, vt, w, kp;  // (kd, np), (kv, np), (np,), (np,)
  void load(const T* k, const T* v, const T* weights, const int32_t* kpos) {
    constexpr int W = Simd<T>::W;
    np = (n + W - 1) / W * W;
    kt.assign(kd * np, T(0));
    vt.assign(kv * np, T(0));
    w.assign(np, T(0));
    kp.assign(np, T(0));
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t c = 0; c < kd; ++c) kt[c * np + j] = k[j * kd + c];
      for (int64_t c = 0; c < kv; ++c) vt[c * np + j] = v[j * kv + c];
      w[j] = weights[j];
      kp[j] = kpos ? T(kpos[j]) : T(0);
    }
  }
};

// The scores of one query against the key vector at j (beta folded into qb),
// with the ALiBi bias; `vis` gets the causal visibility (all true without a
// mask).
template <typename T, int KD>
inline V<T> score(const Group<T>& grp, int64_t kd, const T* qb, int64_t j, int32_t flags,
                  T qp, T rate, V<T>& vis) {
  V<T> s = splat(T(0));
  for (int64_t c = 0; c < (KD > 0 ? KD : kd); ++c) s += qb[c] * load(&grp.kt[c * grp.np + j]);
  if (flags & (kCausal | kAlibi)) {
    V<T> gap = qp - load(&grp.kp[j]);
    if (flags & kAlibi) s -= rate * vmax<T>(gap, -gap);
    if (flags & kCausal) {
      V<T> one = splat(T(1)), zero = splat(T(0));
      vis = (flags & kStrict) ? (gap > zero ? one : zero) : (gap >= zero ? one : zero);
      return s;
    }
  }
  vis = splat(T(1));
  return s;
}

// -------------------------------------------------------------- forward

template <typename T, int KD>
void forward_rows(Group<T>& grp, const T* __restrict q, T beta, const int32_t* qpos, T rate,
                  int32_t flags, int64_t i0, int64_t i1, T* __restrict o, T* __restrict lse,
                  std::vector<T>& sbuf) {
  constexpr int W = Simd<T>::W;
  const int64_t np = grp.np, kd = KD > 0 ? KD : grp.kd, kv = KD > 0 ? KD : grp.kv;
  sbuf.resize(np);
  T* __restrict s = sbuf.data();
  T qb[64];
  V<T> acc[64];
  const T ninf = -std::numeric_limits<T>::infinity();
  const V<T> vninf = splat(ninf), zero = splat(T(0));
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t c = 0; c < kd; ++c) qb[c] = beta * q[i * kd + c];
    const T qp = qpos ? T(qpos[i]) : T(0);
    V<T> mx = vninf, vis;
    for (int64_t j = 0; j < np; j += W) {
      V<T> sj = score<T, KD>(grp, kd, qb, j, flags, qp, rate, vis);
      V<T> on = (load(&grp.w[j]) > zero && vis > zero) ? sj : vninf;
      store(s + j, on);
      mx = vmax<T>(mx, on);
    }
    const T m = hmax<T>(mx);
    T* oi = o + i * kv;
    if (!(m > ninf)) {  // no visible key
      for (int64_t c = 0; c < kv; ++c) oi[c] = T(0);
      lse[i] = std::numeric_limits<T>::infinity();
      continue;
    }
    V<T> total = zero;
    for (int64_t c = 0; c < kv; ++c) acc[c] = zero;
    for (int64_t j = 0; j < np; j += W) {
      V<T> sj = load(s + j);
      V<T> e = sj > vninf ? load(&grp.w[j]) * vexp(sj - m) : zero;
      total += e;
      for (int64_t c = 0; c < kv; ++c) acc[c] += e * load(&grp.vt[c * np + j]);
    }
    const T tot = hsum<T>(total);
    for (int64_t c = 0; c < kv; ++c) oi[c] = hsum<T>(acc[c]) / tot;
    lse[i] = std::log(tot) + m;
  }
}

// ------------------------------------------------------------- backward

// R query rows at once (each with a finite log-normaliser): the keys, values and
// weights are loaded once per vector of keys for all R rows, and the key-side
// sums are read and written once.
template <typename T, int KD, int R>
inline void backward_block(const Group<T>& grp, const T* __restrict q, const T* __restrict c,
                           const T* __restrict lse, const T* __restrict delta,
                           const T* __restrict u, T beta, const int32_t* qpos, T rate,
                           int32_t flags, const int64_t* rows, T* __restrict dqb,
                           T* __restrict dkt, T* __restrict dvt, T* __restrict ds) {
  constexpr int W = Simd<T>::W;
  const int64_t np = grp.np, kd = KD > 0 ? KD : grp.kd, kv = KD > 0 ? KD : grp.kv;
  const V<T> cap = splat(density_cap<T>()), zero = splat(T(0));
  T qb[R][64], ci[R][64], uq[R][64], uc[R][64], li[R], di[R], ui[R], qp[R];
  V<T> dq[R][64];
  bool keys = false;
  for (int r = 0; r < R; ++r) {
    const int64_t i = rows[r];
    li[r] = lse[i];
    di[r] = delta[i];
    ui[r] = u[i];
    qp[r] = qpos ? T(qpos[i]) : T(0);
    keys = keys || ui[r] != T(0);
    for (int64_t cc = 0; cc < kd; ++cc) {
      qb[r][cc] = beta * q[i * kd + cc];
      uq[r][cc] = ui[r] * qb[r][cc];
      dq[r][cc] = zero;
    }
    for (int64_t cc = 0; cc < kv; ++cc) {
      ci[r][cc] = c[i * kv + cc];
      uc[r][cc] = ui[r] * ci[r][cc];
    }
  }
  V<T> vis;
  for (int64_t j = 0; j < np; j += W) {
    V<T> a[R], dS[R];
    for (int r = 0; r < R; ++r) {
      V<T> sj = score<T, KD>(grp, kd, qb[r], j, flags, qp[r], rate, vis);
      a[r] = vis > zero ? vexp(vmin<T>(sj - li[r], cap)) : zero;
      dS[r] = -di[r] + zero;
    }
    for (int64_t cc = 0; cc < kv; ++cc) {
      const V<T> vc = load(&grp.vt[cc * np + j]);
      for (int r = 0; r < R; ++r) dS[r] += ci[r][cc] * vc;
    }
    const V<T> wj = load(&grp.w[j]);
    for (int r = 0; r < R; ++r) dS[r] *= a[r];
    for (int64_t cc = 0; cc < kd; ++cc) {
      const V<T> kc = wj * load(&grp.kt[cc * np + j]);
      for (int r = 0; r < R; ++r) dq[r][cc] += dS[r] * kc;
    }
    if (keys) {
      for (int64_t cc = 0; cc < kd; ++cc) {
        V<T> acc = load(dkt + cc * np + j);
        for (int r = 0; r < R; ++r) acc += uq[r][cc] * dS[r];
        store(dkt + cc * np + j, acc);
      }
      for (int64_t cc = 0; cc < kv; ++cc) {
        V<T> acc = load(dvt + cc * np + j);
        for (int r = 0; r < R; ++r) acc += uc[r][cc] * a[r];
        store(dvt + cc * np + j, acc);
      }
      V<T> acc = load(ds + j);
      for (int r = 0; r < R; ++r) acc += ui[r] * dS[r];
      store(ds + j, acc);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t cc = 0; cc < kd; ++cc) dqb[rows[r] * kd + cc] = hsum<T>(dq[r][cc]);
}

template <typename T, int KD>
void backward_rows(Group<T>& grp, const T* __restrict q, const T* __restrict c,
                   const T* __restrict lse, const T* __restrict delta, const T* __restrict u,
                   T beta, const int32_t* qpos, T rate, int32_t flags, int64_t i0, int64_t i1,
                   T* __restrict dqb, T* __restrict dkt, T* __restrict dvt, T* __restrict ds) {
  // dkt (kd, np), dvt (kv, np) and ds (np) accumulate transposed; rows are taken
  // two at a time (a query that sees no key gets dq = 0 and adds nothing)
  const int64_t kd = KD > 0 ? KD : grp.kd;
  int64_t rows[2];
  int held = 0;
  for (int64_t i = i0; i < i1; ++i) {
    if (!(lse[i] < std::numeric_limits<T>::infinity())) {
      for (int64_t cc = 0; cc < kd; ++cc) dqb[i * kd + cc] = T(0);
      continue;
    }
    rows[held++] = i;
    if (held == 2) {
      backward_block<T, KD, 2>(grp, q, c, lse, delta, u, beta, qpos, rate, flags, rows, dqb,
                               dkt, dvt, ds);
      held = 0;
    }
  }
  if (held == 1)
    backward_block<T, KD, 1>(grp, q, c, lse, delta, u, beta, qpos, rate, flags, rows, dqb, dkt,
                             dvt, ds);
}

// ------------------------------------------------------------ scheduling

// Blocks of queries per group: enough items to keep the threads busy when there
// are few groups (a deterministic function of the sizes only).
inline int64_t query_blocks(int64_t groups, int64_t m) {
  int64_t want = (64 + groups - 1) / groups;
  int64_t most = std::max<int64_t>(m / 64, 1);
  return std::max<int64_t>(std::min(want, most), 1);
}

struct Shapes {
  int64_t G, m, n, kd, kv;
};

template <ffi::DataType D>
ffi::Error check(const Shapes& sh) {
  if (sh.kd > 64 || sh.kv > 64)
    return ffi::Error::InvalidArgument("mfattn fused CPU kernel: head dimension above 64");
  return ffi::Error::Success();
}

template <typename T>
using Kernel = void (*)(Group<T>&, const T*, T, const int32_t*, T, int32_t, int64_t, int64_t, T*,
                        T*, std::vector<T>&);

template <ffi::DataType D>
ffi::Error Forward(ffi::Buffer<D> q, ffi::Buffer<D> k, ffi::Buffer<D> v, ffi::Buffer<D> w,
                   ffi::Buffer<D> beta, ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::S32> kpos,
                   ffi::Buffer<D> rate, ffi::ResultBuffer<D> o, ffi::ResultBuffer<D> lse,
                   int32_t flags) {
  using T = ffi::NativeType<D>;
  auto qd = q.dimensions(), kdims = k.dimensions(), vdims = v.dimensions();
  if (qd.size() < 2 || kdims.size() < 2 || vdims.size() < 2)
    return ffi::Error::InvalidArgument("mfattn fused CPU kernel: inputs of rank < 2");
  Shapes sh;
  sh.m = qd[qd.size() - 2];
  sh.kd = qd[qd.size() - 1];
  sh.n = kdims[kdims.size() - 2];
  sh.kv = vdims[vdims.size() - 1];
  sh.G = sh.m > 0 && sh.kd > 0 ? static_cast<int64_t>(q.element_count()) / (sh.m * sh.kd)
                               : 0;
  if (auto e = check<D>(sh); e.failure()) return e;
  if (sh.G == 0 || sh.m == 0) return ffi::Error::Success();
  const bool positions = flags & (kCausal | kAlibi);
  auto ws = per_sample(w.typed_data(), w.element_count(), sh.n, sh.G);
  auto bs = per_sample(beta.typed_data(), beta.element_count(), 1, sh.G);
  auto rs = per_sample(rate.typed_data(), rate.element_count(), 1, sh.G);
  auto qps = per_sample(qpos.typed_data(), qpos.element_count(), sh.m, sh.G);
  auto kps = per_sample(kpos.typed_data(), kpos.element_count(), sh.n, sh.G);
  const int64_t nb = query_blocks(sh.G, sh.m);
  const int64_t rows = (sh.m + nb - 1) / nb;
  T* od = o->typed_data();
  T* ld = lse->typed_data();
  Kernel<T> run = sh.kd == 4 && sh.kv == 4     ? forward_rows<T, 4>
                  : sh.kd == 8 && sh.kv == 8   ? forward_rows<T, 8>
                  : sh.kd == 16 && sh.kv == 16 ? forward_rows<T, 16>
                                               : forward_rows<T, 0>;
#pragma omp parallel
  {
    Group<T> grp{sh.kd, sh.kv, sh.n, 0, {}, {}, {}, {}};
    std::vector<T> sbuf;
    int64_t loaded = -1;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < sh.G * nb; ++item) {
      const int64_t g = item / nb, b = item % nb;
      if (g != loaded) {
        grp.load(k.typed_data() + g * sh.n * sh.kd, v.typed_data() + g * sh.n * sh.kv, ws.at(g),
                 positions ? kps.at(g) : nullptr);
        loaded = g;
      }
      const int64_t i0 = b * rows, i1 = std::min(sh.m, i0 + rows);
      if (i0 >= i1) continue;
      run(grp, q.typed_data() + g * sh.m * sh.kd, *bs.at(g), positions ? qps.at(g) : nullptr,
          *rs.at(g), flags, i0, i1, od + g * sh.m * sh.kv, ld + g * sh.m, sbuf);
    }
  }
  return ffi::Error::Success();
}

template <typename T>
using BackKernel = void (*)(Group<T>&, const T*, const T*, const T*, const T*, const T*, T,
                            const int32_t*, T, int32_t, int64_t, int64_t, T*, T*, T*, T*);

template <ffi::DataType D>
ffi::Error Backward(ffi::Buffer<D> q, ffi::Buffer<D> k, ffi::Buffer<D> v, ffi::Buffer<D> w,
                    ffi::Buffer<D> beta, ffi::Buffer<ffi::S32> qpos, ffi::Buffer<ffi::S32> kpos,
                    ffi::Buffer<D> rate, ffi::Buffer<D> lse, ffi::Buffer<D> delta,
                    ffi::Buffer<D> c, ffi::Buffer<D> u, ffi::ResultBuffer<D> dqb,
                    ffi::ResultBuffer<D> dk, ffi::ResultBuffer<D> dv, ffi::ResultBuffer<D> ds,
                    int32_t flags) {
  using T = ffi::NativeType<D>;
  auto qd = q.dimensions(), kdims = k.dimensions(), vdims = v.dimensions();
  if (qd.size() < 2 || kdims.size() < 2 || vdims.size() < 2)
    return ffi::Error::InvalidArgument("mfattn fused CPU kernel: inputs of rank < 2");
  Shapes sh;
  sh.m = qd[qd.size() - 2];
  sh.kd = qd[qd.size() - 1];
  sh.n = kdims[kdims.size() - 2];
  sh.kv = vdims[vdims.size() - 1];
  sh.G = sh.m > 0 && sh.kd > 0 ? static_cast<int64_t>(q.element_count()) / (sh.m * sh.kd)
                               : static_cast<int64_t>(k.element_count()) /
                                     std::max<int64_t>(sh.n * sh.kd, 1);
  if (auto e = check<D>(sh); e.failure()) return e;
  const int64_t G = sh.G, m = sh.m, n = sh.n, kd = sh.kd, kv = sh.kv;
  T* dqd = dqb->typed_data();
  T* dkd = dk->typed_data();
  T* dvd = dv->typed_data();
  T* dsd = ds->typed_data();
  std::fill(dkd, dkd + G * n * kd, T(0));
  std::fill(dvd, dvd + G * n * kv, T(0));
  std::fill(dsd, dsd + G * n, T(0));
  if (G == 0 || m == 0 || n == 0) {
    std::fill(dqd, dqd + G * m * kd, T(0));
    return ffi::Error::Success();
  }
  const bool positions = flags & (kCausal | kAlibi);
  auto ws = per_sample(w.typed_data(), w.element_count(), n, G);
  auto us = per_sample(u.typed_data(), u.element_count(), m, G);
  auto bs = per_sample(beta.typed_data(), beta.element_count(), 1, G);
  auto rs = per_sample(rate.typed_data(), rate.element_count(), 1, G);
  auto qps = per_sample(qpos.typed_data(), qpos.element_count(), m, G);
  auto kps = per_sample(kpos.typed_data(), kpos.element_count(), n, G);
  const int64_t nb = query_blocks(G, m);
  const int64_t rows = (m + nb - 1) / nb;
  constexpr int W = Simd<T>::W;
  const int64_t np = (n + W - 1) / W * W;
  const int64_t side = np * (kd + kv + 1);  // one item's key-side sums
  std::vector<T> partial(static_cast<size_t>(G * nb * side));
  BackKernel<T> run = kd == 4 && kv == 4     ? backward_rows<T, 4>
                      : kd == 8 && kv == 8   ? backward_rows<T, 8>
                      : kd == 16 && kv == 16 ? backward_rows<T, 16>
                                             : backward_rows<T, 0>;
#pragma omp parallel
  {
    Group<T> grp{kd, kv, n, 0, {}, {}, {}, {}};
    int64_t loaded = -1;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < G * nb; ++item) {
      const int64_t g = item / nb, b = item % nb;
      if (g != loaded) {
        grp.load(k.typed_data() + g * n * kd, v.typed_data() + g * n * kv, ws.at(g),
                 positions ? kps.at(g) : nullptr);
        loaded = g;
      }
      T* part = partial.data() + item * side;
      std::fill(part, part + side, T(0));
      const int64_t i0 = b * rows, i1 = std::min(m, i0 + rows);
      if (i0 >= i1) continue;
      run(grp, q.typed_data() + g * m * kd, c.typed_data() + g * m * kv, lse.typed_data() + g * m,
          delta.typed_data() + g * m, us.at(g), *bs.at(g), positions ? qps.at(g) : nullptr,
          *rs.at(g), flags, i0, i1, dqd + g * m * kd, part, part + np * kd,
          part + np * (kd + kv));
    }
    // the key side: blocks summed in order, transposed back (the factor beta
    // of dk is in the queries already)
#pragma omp for schedule(static)
    for (int64_t g = 0; g < G; ++g) {
      T* dkg = dkd + g * n * kd;
      T* dvg = dvd + g * n * kv;
      T* dsg = dsd + g * n;
      for (int64_t b = 0; b < nb; ++b) {
        const T* part = partial.data() + (g * nb + b) * side;
        for (int64_t cc = 0; cc < kd; ++cc)
          for (int64_t j = 0; j < n; ++j) dkg[j * kd + cc] += part[cc * np + j];
        for (int64_t cc = 0; cc < kv; ++cc)
          for (int64_t j = 0; j < n; ++j) dvg[j * kv + cc] += part[(kd + cc) * np + j];
        for (int64_t j = 0; j < n; ++j) dsg[j] += part[(kd + kv) * np + j];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

#define MFATTN_FORWARD(NAME, D)                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Forward<D>,                  \
                                ffi::Ffi::Bind()                   \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<ffi::S32>>()  \
                                    .Arg<ffi::Buffer<ffi::S32>>()  \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Ret<ffi::Buffer<D>>()         \
                                    .Ret<ffi::Buffer<D>>()         \
                                    .Attr<int32_t>("flags"));

#define MFATTN_BACKWARD(NAME, D)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Backward<D>,                 \
                                ffi::Ffi::Bind()                   \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<ffi::S32>>()  \
                                    .Arg<ffi::Buffer<ffi::S32>>()  \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Arg<ffi::Buffer<D>>()         \
                                    .Ret<ffi::Buffer<D>>()         \
                                    .Ret<ffi::Buffer<D>>()         \
                                    .Ret<ffi::Buffer<D>>()         \
                                    .Ret<ffi::Buffer<D>>()         \
                                    .Attr<int32_t>("flags"));

MFATTN_FORWARD(MfattnForwardF32, ffi::F32)
MFATTN_FORWARD(MfattnForwardF64, ffi::F64)
MFATTN_BACKWARD(MfattnBackwardF32, ffi::F32)
MFATTN_BACKWARD(MfattnBackwardF64, ffi::F64)

extern "C" int MfattnThreads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
