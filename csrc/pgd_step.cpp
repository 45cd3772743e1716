// drp_kernels.ops._C: the batched PGD step and the random start of the eps ball.
//
// Schemas: TORCH_LIBRARY_FRAGMENT(drp, m) (the library itself is defined in drp.cpp); CPU kernels
// here (at::parallel_for), CUDA kernels in pgd_step_cuda.cu (no torch headers) behind DRP_WITH_CUDA.
//
// Layout: sample b must be the dense block [b*D, (b+1)*D) of every tensor. That
// holds for contiguous and channels_last tensors (the batch stride is outermost
// in both). When x_adv has that form, x, grad and the noise are used as they are
// if they share x_adv's strides, else copied once into x_adv's layout; the
// element-wise math and per-sample norms do not depend on the order inside a
// sample, so results are identical for every layout. An x_adv without that form
// (e.g. a strided view) is computed in a contiguous copy and copied back.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>

#include "pgd_math.h"

#ifdef DRP_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "pgd_step_cuda.cuh"
#endif

namespace drp {
namespace {

using at::Tensor;

// ------------------------------------------------------------------ storage
struct HalfCvt {
  static float to_float(uint16_t b) { return static_cast<float>(c10::Half(b, c10::Half::from_bits())); }
  static uint16_t from_float(float v) { return c10::Half(v).x; }
};
struct BF16Cvt {
  static float to_float(uint16_t b) { return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits())); }
  static uint16_t from_float(float v) { return c10::BFloat16(v).x; }
};

template <typename S> struct Store;
template <> struct Store<float> {
  using A = float;
  static A load(float v) { return v; }
  static float store(A v, A, A, A) { return v; }
};
template <> struct Store<double> {
  using A = double;
  static A load(double v) { return v; }
  static double store(A v, A, A, A) { return v; }
};
template <> struct Store<c10::Half> {
  using A = float;
  static A load(c10::Half v) { return static_cast<float>(v); }
  static c10::Half store(A v, A x, A lo, A hi) {
    return c10::Half(round16_toward<HalfCvt>(v, x, lo, hi), c10::Half::from_bits());
  }
};
template <> struct Store<c10::BFloat16> {
  using A = float;
  static A load(c10::BFloat16 v) { return static_cast<float>(v); }
  static c10::BFloat16 store(A v, A x, A lo, A hi) {
    return c10::BFloat16(round16_toward<BF16Cvt>(v, x, lo, hi), c10::BFloat16::from_bits());
  }
};

// --------------------------------------------------------------- CPU kernels
constexpr int64_t kGrain = 32768;

// Branch-free form of add_toward for a step d of known sign (vectorisable).
template <typename A, bool POSITIVE>
inline A add_toward_signed(A x, A d) {
  using U = typename BitsOf<A>::type;
  const A s = x + d;
  const A bp = s - x;
  const A ap = s - bp;
  const A err = (x - ap) + (d - bp);
  const U b = to_bits(s);
  const U sign = U(1) << (sizeof(U) * 8 - 1);
  U stepped;
  if (POSITIVE) stepped = b == U(0) ? U(sign | U(1)) : ((b & sign) ? U(b + 1) : U(b - 1));  // one ulp down
  else stepped = b == sign ? U(1) : ((b & sign) ? U(b - 1) : U(b + 1));                    // one ulp up
  const bool over = POSITIVE ? (err < A(0)) : (err > A(0));
  return from_bits<A>(over ? stepped : b);
}

// linf over one run of elements of the same sample (e, a fixed); scalar form.
template <typename S>
void linf_run_scalar(S* __restrict__ out, const S* __restrict__ x, const S* __restrict__ g, int64_t n,
              typename Store<S>::A e, typename Store<S>::A a, typename Store<S>::A lo, typename Store<S>::A hi) {
  using A = typename Store<S>::A;
  for (int64_t k = 0; k < n; ++k) {
    const A xv = Store<S>::load(x[k]);
    const A gv = Store<S>::load(g[k]);
    const A s = A(gv > A(0)) - A(gv < A(0));  // torch.sign: 0 for 0 and NaN
    A v = Store<S>::load(out[k]) + a * s;
    const A blo = add_toward_signed<A, false>(xv, -e);
    const A bhi = add_toward_signed<A, true>(xv, e);
    v = v < blo ? blo : v;
    v = v > bhi ? bhi : v;
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    out[k] = Store<S>::store(v, xv, lo, hi);
  }
}

// ------------------------------------------------ float32 fast path (SIMD)
// GCC vector extensions; target_clones builds an AVX2 copy picked at load time
// and a baseline (SSE2) copy. Same operations in the same order as the scalar
// code, so results are identical; no FMA is enabled (no contraction).
namespace v8 {
typedef float F __attribute__((vector_size(32)));
typedef int32_t I __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));
typedef double D4 __attribute__((vector_size(32)));
#define DRP_VI static inline __attribute__((always_inline))
DRP_VI F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(F));
  return v;
}
DRP_VI void store(float* p, F v) { std::memcpy(p, &v, sizeof(F)); }
DRP_VI F splat(float s) { return F{} + s; }
DRP_VI I isplat(int32_t s) { return I{} + s; }
DRP_VI F sel(I m, F a, F b) { return (F)((m & (I)a) | (~m & (I)b)); }
DRP_VI F step_down(F s) {
  const I b = (I)s;
  const I r = (b < 0) ? b + 1 : b - 1;
  return (F)((b == 0) ? isplat(INT32_MIN | 1) : r);
}
DRP_VI F step_up(F s) {
  const I b = (I)s;
  const I r = (b < 0) ? b - 1 : b + 1;
  return (F)((b == isplat(INT32_MIN)) ? isplat(1) : r);
}
DRP_VI F add_toward(F x, F d) {  // see drp::add_toward
  const F s = x + d;
  const F bp = s - x;
  const F ap = s - bp;
  const F err = (x - ap) + (d - bp);
  const F z = F{};
  return sel((d > z) & (err < z), step_down(s), sel((d < z) & (err > z), step_up(s), s));
}
DRP_VI F clamp(F v, F lo, F hi) {
  v = sel(v < lo, lo, v);
  return sel(v > hi, hi, v);
}
DRP_VI void add_sq(D4& acc0, D4& acc1, F v) {
  const D4 a = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), D4);
  const D4 b = __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), D4);
  acc0 += a * a;
  acc1 += b * b;
}
DRP_VI double hsum(D4 a, D4 b) {
  const D4 c = a + b;
  return (c[0] + c[1]) + (c[2] + c[3]);
}
}  // namespace v8

__attribute__((target_clones("avx2", "default")))
void linf_run_f32(float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ g, int64_t n,
                  float e, float a, float lo, float hi) {
  using namespace v8;
  const F E = splat(e), NE = splat(-e), A = splat(a), LO = splat(lo), HI = splat(hi), ONE = splat(1.0f), Z = F{};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const F xv = load(x + k), gv = load(g + k);
    const F s = sel(gv > Z, ONE, Z) - sel(gv < Z, ONE, Z);
    F v = load(out + k) + A * s;
    v = clamp(v, add_toward(xv, NE), add_toward(xv, E));
    store(out + k, clamp(v, LO, HI));
  }
  linf_run_scalar<float>(out + k, x + k, g + k, n - k, e, a, lo, hi);
}

// One l2 step on one float32 sample (three passes over data that stays in cache).
__attribute__((target_clones("avx2", "default")))
void l2_sample_f32(float* __restrict__ o, const float* __restrict__ x, const float* __restrict__ g, int64_t D,
                   float a, float e, float lo, float hi) {
  using namespace v8;
  const int64_t Dv = D - D % 8;
  D4 s0 = D4{}, s1 = D4{};
  for (int64_t k = 0; k < Dv; k += 8) add_sq(s0, s1, load(g + k));
  double sg = hsum(s0, s1);
  for (int64_t k = Dv; k < D; ++k) sg += static_cast<double>(g[k]) * static_cast<double>(g[k]);
  float gnc = static_cast<float>(std::sqrt(sg));
  gnc = gnc < 1e-12f ? 1e-12f : gnc;
  const F A = splat(a), G = splat(gnc);
  s0 = D4{}, s1 = D4{};
  for (int64_t k = 0; k < Dv; k += 8) add_sq(s0, s1, (load(o + k) + A * (load(g + k) / G)) - load(x + k));
  double sd = hsum(s0, s1);
  for (int64_t k = Dv; k < D; ++k) {
    const double d = (o[k] + a * (g[k] / gnc)) - x[k];
    sd += d * d;
  }
  const float dn = static_cast<float>(std::sqrt(sd));
  const float factor = dn > e ? e / dn : 1.0f;
  const F FA = splat(factor), LO = splat(lo), HI = splat(hi);
  for (int64_t k = 0; k < Dv; k += 8) {
    const F xv = load(x + k);
    const F d = (load(o + k) + A * (load(g + k) / G)) - xv;
    store(o + k, clamp(add_toward(xv, d * FA), LO, HI));
  }
  for (int64_t k = Dv; k < D; ++k) {
    const float d = (o[k] + a * (g[k] / gnc)) - x[k];
    float v = drp::add_toward(x[k], d * factor);
    v = v < lo ? lo : v;
    o[k] = v > hi ? hi : v;
  }
}

template <typename S>
inline void linf_run(S* out, const S* x, const S* g, int64_t n, typename Store<S>::A e, typename Store<S>::A a,
                     typename Store<S>::A lo, typename Store<S>::A hi) {
  if constexpr (std::is_same_v<S, float>) linf_run_f32(out, x, g, n, e, a, lo, hi);
  else linf_run_scalar(out, x, g, n, e, a, lo, hi);
}

template <typename S>
void linf_cpu(S* out, const S* x, const S* g, int64_t B, int64_t D, const Budget<typename Store<S>::A>& bud) {
  const int64_t n = B * D;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / D;
      const int64_t stop = std::min(end, (b + 1) * D);
      if (bud.on(b)) linf_run(out + i, x + i, g + i, stop - i, bud.e(b), bud.a(b), bud.lower, bud.upper);
      i = stop;
    }
  });
}

// Sum of squares of f(k) over k < n in double with 8 independent accumulators
// (vectorisable). Double keeps the per-sample norms accurate and, in practice,
// independent of the element order, so of the memory layout.
template <typename F>
inline double sumsq8(int64_t n, F f) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) {
      const double v = static_cast<double>(f(k + j));
      acc[j] += v * v;
    }
  for (; k < n; ++k) {
    const double v = static_cast<double>(f(k));
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename A>
inline A clamp_norm(double n2) {
  const A n = static_cast<A>(std::sqrt(n2));
  return n < A(1e-12) ? A(1e-12) : n;
}

template <typename S>
void l2_cpu(S* out, const S* x, const S* g, int64_t B, int64_t D, const Budget<typename Store<S>::A>& bud) {
  using A = typename Store<S>::A;
  at::parallel_for(0, B, std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!bud.on(b)) continue;
      S* o = out + b * D;
      const S* xs = x + b * D;
      const S* gs = g + b * D;
      const A a = bud.a(b), lo = bud.lower, hi = bud.upper;
      if constexpr (std::is_same_v<S, float>) {
        l2_sample_f32(o, xs, gs, D, a, bud.e(b), lo, hi);
        continue;
      }
      const A gnc = clamp_norm<A>(sumsq8(D, [&](int64_t k) { return Store<S>::load(gs[k]); }));
      const A dn = static_cast<A>(std::sqrt(sumsq8(D, [&](int64_t k) {
        return (Store<S>::load(o[k]) + a * (Store<S>::load(gs[k]) / gnc)) - Store<S>::load(xs[k]);
      })));
      const A e = bud.e(b);
      const A factor = dn > e ? e / dn : A(1);
      for (int64_t k = 0; k < D; ++k) {
        const A xv = Store<S>::load(xs[k]);
        const A d = (Store<S>::load(o[k]) + a * (Store<S>::load(gs[k]) / gnc)) - xv;
        A v = add_toward(xv, d * factor);
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        o[k] = Store<S>::store(v, xv, lo, hi);
      }
    }
  });
}

template <typename S>
void init_linf_cpu(S* out, const S* x, const float* u, int64_t B, int64_t D, const Budget<typename Store<S>::A>& bud) {
  using A = typename Store<S>::A;
  at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const A xv = Store<S>::load(x[i]);
      const A noise = (A(2) * static_cast<A>(u[i]) - A(1)) * bud.e(i / D);
      A v = add_toward(xv, noise);
      v = v < bud.lower ? bud.lower : v;
      v = v > bud.upper ? bud.upper : v;
      out[i] = Store<S>::store(v, xv, bud.lower, bud.upper);
    }
  });
}

template <typename S>
void init_l2_cpu(S* out, const S* x, const float* u, const float* r, int64_t B, int64_t D,
                 const Budget<typename Store<S>::A>& bud) {
  using A = typename Store<S>::A;
  at::parallel_for(0, B, std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* us = u + b * D;
      const A nc = clamp_norm<A>(sumsq8(D, [&](int64_t k) { return static_cast<A>(us[k]); }));
      const A radius = static_cast<A>(std::pow(static_cast<A>(r[b]), A(1) / static_cast<A>(D))) * bud.e(b);
      for (int64_t k = 0; k < D; ++k) {
        const A xv = Store<S>::load(x[b * D + k]);
        A v = add_toward(xv, (static_cast<A>(us[k]) / nc) * radius);
        v = v < bud.lower ? bud.lower : v;
        v = v > bud.upper ? bud.upper : v;
        out[b * D + k] = Store<S>::store(v, xv, bud.lower, bud.upper);
      }
    }
  });
}

// ------------------------------------------------------------------ checks
at::ScalarType compute_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_floating(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

void check_like(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

void check_per_sample(const c10::optional<Tensor>& t, const Tensor& x, at::ScalarType dtype, const char* name) {
  if (!t.has_value()) return;
  const Tensor& v = *t;
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), name, " must be a 1-D tensor of length B=", x.size(0),
              ", got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", v.device());
  TORCH_CHECK(v.is_contiguous(), name, " must be contiguous");
}

// Values of a per-sample budget on the CPU: >= 0 and not NaN. (CUDA values are
// checked by the Python wrapper; checking them here would synchronise.)
template <typename A>
void check_nonneg_cpu(const c10::optional<Tensor>& t, const char* name) {
  if (!t.has_value() || !t->is_cpu()) return;
  const A* p = t->data_ptr<A>();
  for (int64_t i = 0; i < t->numel(); ++i)
    TORCH_CHECK(p[i] >= A(0), name, "[", i, "] must be >= 0, got ", p[i]);
}

void check_scalars(double eps, double lower, double upper, const std::string& norm) {
  TORCH_CHECK(norm == "linf" || norm == "l2", "norm must be 'linf' or 'l2', got '", norm, "'");
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0, got ", eps);
  TORCH_CHECK(!std::isnan(lower) && !std::isnan(upper) && lower <= upper, "lower must be <= upper, got lower=", lower,
              ", upper=", upper);
}

bool same_layout(const Tensor& t, const Tensor& ref) {
  for (int64_t d = 0; d < ref.dim(); ++d)
    if (ref.size(d) > 1 && t.stride(d) != ref.stride(d)) return false;
  return t.is_non_overlapping_and_dense();
}

// True when sample b is the dense block [b*D, (b+1)*D) starting at data_ptr().
bool sample_blocks(const Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  const int64_t B = t.size(0);
  return B <= 1 || t.stride(0) * B == t.numel();
}

// t in ref's layout: t itself when it already matches, else one copy.
Tensor in_layout_of(const Tensor& t, const Tensor& ref) {
  if (same_layout(t, ref)) return t;
  Tensor out = at::empty_like(ref, t.options());
  out.copy_(t);
  return out;
}

template <typename A>
Budget<A> make_budget(double eps, double alpha, const c10::optional<Tensor>& eps_ps,
                      const c10::optional<Tensor>& alpha_ps, const c10::optional<Tensor>& active, double lower,
                      double upper) {
  return Budget<A>{round_down_to<A>(eps),
                   static_cast<A>(alpha),
                   eps_ps.has_value() ? eps_ps->data_ptr<A>() : nullptr,
                   alpha_ps.has_value() ? alpha_ps->data_ptr<A>() : nullptr,
                   active.has_value() ? active->data_ptr<bool>() : nullptr,
                   round_up_to<A>(lower),
                   round_down_to<A>(upper)};
}

#define DRP_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ------------------------------------------------------------------- pgd_step_
void check_step(const Tensor& x_adv, const Tensor& x, const Tensor& grad, double eps, double alpha,
                const c10::optional<Tensor>& eps_ps, const c10::optional<Tensor>& alpha_ps,
                const c10::optional<Tensor>& active, const std::string& norm, double lower, double upper) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have a batch dimension, got a 0-d tensor");
  check_like(x_adv, x, "x_adv");
  check_like(grad, x, "grad");
  check_scalars(eps, lower, upper, norm);
  TORCH_CHECK(alpha >= 0.0, "alpha must be >= 0, got ", alpha);
  const auto cd = compute_dtype(x);
  check_per_sample(eps_ps, x, cd, "eps");
  check_per_sample(alpha_ps, x, cd, "alpha");
  check_per_sample(active, x, at::kBool, "active");
  if (cd == at::kDouble) {
    check_nonneg_cpu<double>(eps_ps, "eps");
    check_nonneg_cpu<double>(alpha_ps, "alpha");
  } else {
    check_nonneg_cpu<float>(eps_ps, "eps");
    check_nonneg_cpu<float>(alpha_ps, "alpha");
  }
}

// Runs kernel(work, xs, gs) on tensors in a sample-block layout, then writes back.
template <typename K>
void with_step_layout(const Tensor& x_adv, const Tensor& x, const Tensor& grad, K kernel) {
  if (sample_blocks(x_adv)) {
    kernel(x_adv, in_layout_of(x, x_adv), in_layout_of(grad, x_adv));
    return;
  }
  Tensor work = x_adv.contiguous();
  kernel(work, x.contiguous(), grad.contiguous());
  x_adv.copy_(work);
}

void pgd_step_cpu(const Tensor& x_adv, const Tensor& x, const Tensor& grad, double eps, double alpha,
                  const c10::optional<Tensor>& eps_ps, const c10::optional<Tensor>& alpha_ps,
                  const c10::optional<Tensor>& active, c10::string_view norm_sv, double lower, double upper) {
  const std::string norm(norm_sv);
  check_step(x_adv, x, grad, eps, alpha, eps_ps, alpha_ps, active, norm, lower, upper);
  if (x.numel() == 0) return;
  const int64_t B = x.size(0), D = x.numel() / B;
  with_step_layout(x_adv, x, grad, [&](const Tensor& w, const Tensor& xs, const Tensor& gs) {
    DRP_DISPATCH(x.scalar_type(), "drp::pgd_step_", [&] {
      using A = typename Store<scalar_t>::A;
      const auto bud = make_budget<A>(eps, alpha, eps_ps, alpha_ps, active, lower, upper);
      if (norm == "linf")
        linf_cpu(w.data_ptr<scalar_t>(), xs.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), B, D, bud);
      else
        l2_cpu(w.data_ptr<scalar_t>(), xs.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), B, D, bud);
    });
  });
}

// ------------------------------------------------------------------ ball_init
void check_init(const Tensor& x, const Tensor& noise, const c10::optional<Tensor>& radius_u, double eps,
                const c10::optional<Tensor>& eps_ps, const std::string& norm, double lower, double upper) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have a batch dimension, got a 0-d tensor");
  check_scalars(eps, lower, upper, norm);
  TORCH_CHECK(noise.sizes() == x.sizes() && noise.scalar_type() == at::kFloat && noise.device() == x.device(),
              "noise must be a float32 tensor of x's shape and device");
  if (norm == "l2") {
    TORCH_CHECK(radius_u.has_value(), "radius_u (U[0,1) per sample) is required for norm='l2'");
    check_per_sample(radius_u, x, at::kFloat, "radius_u");
  }
  const auto cd = compute_dtype(x);
  check_per_sample(eps_ps, x, cd, "eps");
  if (cd == at::kDouble) check_nonneg_cpu<double>(eps_ps, "eps");
  else check_nonneg_cpu<float>(eps_ps, "eps");
}

// channels_last(_3d) when x is in that layout, else contiguous (the fake kernel in
// drp_kernels/ops/pgd_step.py mirrors this rule).
Tensor init_output(const Tensor& x) {
  auto fmt = at::MemoryFormat::Contiguous;
  if (!x.is_contiguous()) {
    if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) fmt = at::MemoryFormat::ChannelsLast;
    if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) fmt = at::MemoryFormat::ChannelsLast3d;
  }
  return at::empty(x.sizes(), x.options().memory_format(fmt));
}

Tensor ball_init_cpu(const Tensor& x, const Tensor& noise, const c10::optional<Tensor>& radius_u, double eps,
                     const c10::optional<Tensor>& eps_ps, c10::string_view norm_sv, double lower, double upper) {
  const std::string norm(norm_sv);
  check_init(x, noise, radius_u, eps, eps_ps, norm, lower, upper);
  Tensor out = init_output(x);
  if (x.numel() == 0) return out;
  const int64_t B = x.size(0), D = x.numel() / B;
  const Tensor xs = in_layout_of(x, out), us = in_layout_of(noise, out);
  DRP_DISPATCH(x.scalar_type(), "drp::ball_init", [&] {
    using A = typename Store<scalar_t>::A;
    const auto bud = make_budget<A>(eps, 0.0, eps_ps, c10::nullopt, c10::nullopt, lower, upper);
    if (norm == "linf")
      init_linf_cpu(out.data_ptr<scalar_t>(), xs.data_ptr<scalar_t>(), us.data_ptr<float>(), B, D, bud);
    else
      init_l2_cpu(out.data_ptr<scalar_t>(), xs.data_ptr<scalar_t>(), us.data_ptr<float>(),
                  radius_u->data_ptr<float>(), B, D, bud);
  });
  return out;
}

// --------------------------------------------------------------------- CUDA
#ifdef DRP_WITH_CUDA
cuda::DType cuda_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", st);
  }
}

const void* opt_ptr(const c10::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void pgd_step_cuda(const Tensor& x_adv, const Tensor& x, const Tensor& grad, double eps, double alpha,
                   const c10::optional<Tensor>& eps_ps, const c10::optional<Tensor>& alpha_ps,
                   const c10::optional<Tensor>& active, c10::string_view norm_sv, double lower, double upper) {
  const std::string norm(norm_sv);
  check_step(x_adv, x, grad, eps, alpha, eps_ps, alpha_ps, active, norm, lower, upper);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.numel() / B;
  with_step_layout(x_adv, x, grad, [&](const Tensor& w, const Tensor& xs, const Tensor& gs) {
    cuda::StepParams p{w.data_ptr(), xs.data_ptr(), gs.data_ptr(), B, D, eps, alpha, opt_ptr(eps_ps),
                       opt_ptr(alpha_ps), active.has_value() ? active->data_ptr<bool>() : nullptr, lower, upper};
    const auto dt = cuda_dtype(x.scalar_type());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cudaError_t err;
    if (norm == "linf") {
      err = cuda::pgd_step_linf(dt, p, stream);
    } else {
      const size_t bytes = cuda::l2_scratch_bytes(dt, B, D);
      Tensor scratch = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
      err = cuda::pgd_step_l2(dt, p, bytes ? scratch.data_ptr() : nullptr, stream);
    }
    TORCH_CHECK(err == cudaSuccess, "drp::pgd_step_ CUDA launch failed: ", cudaGetErrorString(err));
  });
}

Tensor ball_init_cuda(const Tensor& x, const Tensor& noise, const c10::optional<Tensor>& radius_u, double eps,
                      const c10::optional<Tensor>& eps_ps, c10::string_view norm_sv, double lower, double upper) {
  const std::string norm(norm_sv);
  check_init(x, noise, radius_u, eps, eps_ps, norm, lower, upper);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = init_output(x);
  if (x.numel() == 0) return out;
  const int64_t B = x.size(0), D = x.numel() / B;
  const Tensor xs = in_layout_of(x, out), us = in_layout_of(noise, out);
  cuda::InitParams p{out.data_ptr(), xs.data_ptr(), us.data_ptr<float>(),
                     radius_u.has_value() ? radius_u->data_ptr<float>() : nullptr, B, D, eps, opt_ptr(eps_ps),
                     lower, upper};
  const auto dt = cuda_dtype(x.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = norm == "linf" ? cuda::ball_init_linf(dt, p, stream) : cuda::ball_init_l2(dt, p, stream);
  TORCH_CHECK(err == cudaSuccess, "drp::ball_init CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}
#endif

}  // namespace
}  // namespace drp

TORCH_LIBRARY_FRAGMENT(drp, m) {
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor x, Tensor grad, float eps, float alpha, Tensor? eps_per_sample, "
      "Tensor? alpha_per_sample, Tensor? active, str norm, float lower, float upper) -> ()");
  m.def(
      "ball_init(Tensor x, Tensor noise, Tensor? radius_u, float eps, Tensor? eps_per_sample, str norm, "
      "float lower, float upper) -> Tensor");
}

TORCH_LIBRARY_IMPL(drp, CPU, m) {
  m.impl("pgd_step_", &drp::pgd_step_cpu);
  m.impl("ball_init", &drp::ball_init_cpu);
}

#ifdef DRP_WITH_CUDA
TORCH_LIBRARY_IMPL(drp, CUDA, m) {
  m.impl("pgd_step_", &drp::pgd_step_cuda);
  m.impl("ball_init", &drp::ball_init_cuda);
}
#endif
