// drp_kernels._C: the all-pairs lp distance out[b, n] = (sum_k |x[b, k] - w[n, k]|^p)^(1/p)
// on the CPU, forward and fused backward, for p in [1, inf].
//
// Schemas: TORCH_LIBRARY_FRAGMENT(drp, m) (the library itself is defined in pgd_step.cpp).
//   lp_dist_cpu_forward(x, w, p) -> (out, idx)     idx: (B, N) first arg-max k for p = inf, else (0,)
//   lp_dist_cpu_backward(grad, x, w, out, idx, p, need_x, need_w) -> (grad_x, grad_w)
// The autograd wiring and the Triton (CUDA) path live in drp_kernels/ops/lp_dist.py.
//
// Arithmetic: float32 for float32/float16/bfloat16 inputs, float64 when either input is
// float64. Finite p is computed in two passes per tile, as an online softmax is scaled:
// m = max_k |d_k|, then out = m * (sum_k (|d_k| / m)^p)^(1/p), so p = 1000 neither
// overflows nor underflows (p = 1 needs no scaling and runs one pass). Integer powers are
// repeated multiplications; a non-integer p uses a vector exp2(p * log2 t) in float (polynomials,
// ~1e-7 relative) and std::pow lane by lane in double. Terms that would go denormal (below 2^-100
// of the largest, 2^-900 in double) are flushed to 0: x86 multiplies denormals ~100x slower.
// The backward weight is (|d| / out)^(p - 1) for p <= 16; above, 1 / out would carry out's
// rounding error amplified p - 1 times, so each pair's max and scaled sum are recomputed.
//
// Blocking (a GEMM's): the forward copies w once, transposed and zero-padded, to wT (D, Np),
// and x to a padded (Bp, D) buffer of the compute dtype (documented copies, O((B + N) D)).
// A task owns MB rows of x times one panel of NV * lanes columns of wT; inside, a micro-kernel
// keeps an RB x (NV * lanes) accumulator tile in registers while it walks k, reusing every
// loaded w vector for RB rows. The backward works on padded row-major copies and splits the
// rows of x into one chunk per thread: each chunk owns its rows of grad_x and writes its own
// partial grad_w (N x D), summed at the end, so no B x N x D buffer and no atomics exist.
// p = inf needs no recomputation: the saved arg-max index turns the backward into a
// scatter-add of sign(d) * grad at one coordinate per (b, n).
//
// SIMD: csrc/lp_dist_kernels.h is compiled three times (AVX-512, AVX2 + FMA, baseline SSE2)
// and the widest copy the CPU supports runs; DRP_CPU_ISA=avx512|avx2|generic forces one.
#include <torch/extension.h>

#include <ATen/Parallel.h>

// The AVX-512 / AVX2 copies need GCC's target pragmas and x86; elsewhere only the baseline copy
// (GCC / Clang vector extensions) is built.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LPD_X86_COPIES 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

namespace drp {
namespace lpd {

using at::Tensor;

enum PowMode { kPow1 = 1, kPow2 = 2, kPow7 = 7, kPow8 = 8, kPowInt = -1, kPowReal = -2 };

// The power plan of a finite p: p itself in the forward sum, p - 1 in the backward weight.
struct PowPlan {
  int fwd_mode;
  int bwd_mode;
  bool sign_only;  // p = 1: the backward weight is sign(d)
  int e_fwd, e_bwd;
};

#ifdef LPD_X86_COPIES
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define LPD_NS avx512
#define LPD_VB 64
#define LPD_RB 4
#define LPD_NV 2
#define LPD_BRB 4
#define LPD_BRN 4
#include "lp_dist_kernels.h"  // undefines the LPD_* parameters at its end
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LPD_NS avx2
#define LPD_VB 32
#define LPD_RB 2
#define LPD_NV 2
#define LPD_BRB 2
#define LPD_BRN 4
#include "lp_dist_kernels.h"  // undefines the LPD_* parameters at its end
#pragma GCC pop_options
#endif  // LPD_X86_COPIES

#define LPD_NS generic
#define LPD_VB 16
#define LPD_RB 2
#define LPD_NV 2
#define LPD_BRB 2
#define LPD_BRN 4
#include "lp_dist_kernels.h"  // undefines the LPD_* parameters at its end

namespace {

// Work (element operations) below which an op runs on the calling thread only.
constexpr int64_t kSerialWork = int64_t(1) << 20;
// Above this p the backward recomputes each pair's max and scaled sum instead of using 1 / out.
constexpr double kRecomputeP = 16.0;
// Cap on the per-thread partial grad_w buffers of the backward.
constexpr int64_t kPartialBytes = int64_t(512) << 20;

template <typename T>
struct Isa {
  const char* name;
  int lanes, rb, nv, brb, brn;
  void (*fwd)(const T*, int64_t, const T*, int64_t, int64_t, double, const PowPlan&, T*, int64_t*, T*, T*);
  void (*bwd)(const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*, T*, double,
              const PowPlan&);
};

#define LPD_ISA(NS, T, SUF)                                                                                  \
  Isa<T> {                                                                                                   \
    #NS, NS::Vec<T>::L, NS::RB, NS::NV, NS::BRB, NS::BRN, &NS::fwd_tile_##SUF, &NS::bwd_rows_##SUF          \
  }

#ifdef LPD_X86_COPIES
bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return ok;
}
bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
bool cpu_has_avx512() { return false; }
bool cpu_has_avx2() { return false; }
#endif

std::string isa_choice() {
  const char* env = std::getenv("DRP_CPU_ISA");
  std::string want = env ? std::string(env) : std::string("auto");
  if (want.empty()) want = "auto";
  TORCH_CHECK_VALUE(want == "auto" || want == "avx512" || want == "avx2" || want == "generic",
                    "DRP_CPU_ISA must be one of auto, avx512, avx2, generic; got '", want, "'");
  if ((want == "auto" || want == "avx512") && cpu_has_avx512()) return "avx512";
  if ((want == "auto" || want == "avx512" || want == "avx2") && cpu_has_avx2()) return "avx2";
  return "generic";
}

template <typename T>
Isa<T> pick_isa();
template <>
Isa<float> pick_isa<float>() {
  const std::string c = isa_choice();
#ifdef LPD_X86_COPIES
  if (c == "avx512") return LPD_ISA(avx512, float, f32);
  if (c == "avx2") return LPD_ISA(avx2, float, f32);
#endif
  return LPD_ISA(generic, float, f32);
}
template <>
Isa<double> pick_isa<double>() {
  const std::string c = isa_choice();
#ifdef LPD_X86_COPIES
  if (c == "avx512") return LPD_ISA(avx512, double, f64);
  if (c == "avx2") return LPD_ISA(avx2, double, f64);
#endif
  return LPD_ISA(generic, double, f64);
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

PowPlan make_plan(double p) {
  PowPlan plan{kPowReal, kPowReal, false, 0, 0};
  if (p == 1.0) {
    plan.fwd_mode = kPow1;
    plan.sign_only = true;
    return plan;
  }
  const bool integer = std::isfinite(p) && p == std::floor(p) && p <= 1.0e6;
  if (!integer) return plan;
  const int e = static_cast<int>(p);
  plan.e_fwd = e;
  plan.e_bwd = e - 1;
  plan.fwd_mode = e == 2 ? kPow2 : (e == 8 ? kPow8 : kPowInt);
  plan.bwd_mode = e == 2 ? kPow1 : (e == 8 ? kPow7 : kPowInt);
  return plan;
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_inputs(const Tensor& x, const Tensor& w, double p, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (B, D), got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be 2-D (N, D), got ", w.dim(), "-D shape ", w.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(x.scalar_type()), op,
                    ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(is_float_dtype(w.scalar_type()), op,
                    ": w must be float32, float16, bfloat16 or float64, got ", w.scalar_type());
  TORCH_CHECK_VALUE(x.device() == w.device(), op, ": w must be on x's device ", x.device(), ", got ", w.device());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.size(1) == w.size(1), op, ": x has D=", x.size(1), " but w has D=", w.size(1),
                    ": the feature dimensions must match");
  TORCH_CHECK_VALUE(!std::isnan(p) && p >= 1.0, op, ": p must be a float in [1, inf], got ", p);
}

at::ScalarType compute_dtype(const Tensor& x, const Tensor& w) {
  return (x.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// out = NaN (and idx = the first NaN coordinate) for every pair whose rows hold a NaN: the
// SIMD max ignores NaN, so these pairs are patched here (O((B + N) D) to find them).
template <typename T>
void patch_nan_rows(const T* xc, const T* wc, int64_t B, int64_t N, int64_t D, int64_t ldx, int64_t ldw_row,
                    T* out, int64_t* idx) {
  std::vector<char> xn(B, 0), wn(N, 0);
  bool any = false;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < D; ++k)
      if (std::isnan(xc[b * ldx + k])) {
        xn[b] = 1;
        any = true;
        break;
      }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < D; ++k)
      if (std::isnan(wc[n * ldw_row + k])) {
        wn[n] = 1;
        any = true;
        break;
      }
  if (!any) return;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      if (!xn[b] && !wn[n]) continue;
      out[b * N + n] = std::numeric_limits<T>::quiet_NaN();
      if (idx) {
        for (int64_t k = 0; k < D; ++k)
          if (std::isnan(xc[b * ldx + k] - wc[n * ldw_row + k])) {
            idx[b * N + n] = k;
            break;
          }
      }
    }
}

// Runs the forward tiles: out (B, N), and for p = inf idx (B, N); with m / s (finite p > 1)
// also each pair's max |d| and scaled sum (what the backward of a large p recomputes).
template <typename T>
void run_tiles(const Tensor& x, const Tensor& w, double p, T* op, int64_t* ip, T* mp, T* sp) {
  const Isa<T> isa = pick_isa<T>();
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1);
  const int64_t RB = isa.rb, NB = isa.nv * isa.lanes;
  const int64_t Bp = round_up(B, RB), Np = round_up(N, NB);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  // documented copies: x in the compute dtype, padded to whole row tiles; w transposed and padded
  Tensor xc = at::zeros({Bp, D}, opts);
  xc.narrow(0, 0, B).copy_(x);
  Tensor wT = at::zeros({D, Np}, opts);
  wT.narrow(1, 0, N).copy_(w.t());
  const T* xp = xc.data_ptr<T>();
  const T* wp = wT.data_ptr<T>();
  const PowPlan plan = make_plan(p);

  const int64_t MB = RB * std::max<int64_t>(1, 64 / RB);
  const int64_t nbb = (Bp + MB - 1) / MB, npan = Np / NB;
  const int64_t task_work = MB * NB * std::max<int64_t>(D, 1) * (p == INFINITY || p == 1.0 ? 1 : 2);
  const int64_t grain = std::max<int64_t>(1, kSerialWork / task_work);
  at::parallel_for(0, nbb * npan, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> tile(RB * NB), tm(mp ? RB * NB : 0), ts(mp ? RB * NB : 0);
    std::vector<int64_t> tidx(RB * NB);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bb = t / npan, pan = t % npan;
      const int64_t n0 = pan * NB, ncols = std::min<int64_t>(NB, N - n0);
      const int64_t bend = std::min<int64_t>(Bp, (bb + 1) * MB);
      for (int64_t b = bb * MB; b < bend; b += RB) {
        isa.fwd(xp + b * D, D, wp + n0, Np, D, p, plan, tile.data(), tidx.data(), mp ? tm.data() : nullptr,
                mp ? ts.data() : nullptr);
        const int64_t nrows = std::min<int64_t>(RB, B - b);
        for (int64_t r = 0; r < nrows; ++r) {
          std::memcpy(op + (b + r) * N + n0, tile.data() + r * NB, ncols * sizeof(T));
          if (ip) std::memcpy(ip + (b + r) * N + n0, tidx.data() + r * NB, ncols * sizeof(int64_t));
          if (mp) {
            std::memcpy(mp + (b + r) * N + n0, tm.data() + r * NB, ncols * sizeof(T));
            std::memcpy(sp + (b + r) * N + n0, ts.data() + r * NB, ncols * sizeof(T));
          }
        }
      }
    }
  });
  // w rows live in column n of wT
  Tensor wc = wT.narrow(1, 0, N).t().contiguous();
  patch_nan_rows<T>(xp, wc.data_ptr<T>(), B, N, D, D, D, op, ip);
}

template <typename T>
void forward_impl(const Tensor& x, const Tensor& w, double p, Tensor& out, Tensor& idx) {
  run_tiles<T>(x, w, p, out.data_ptr<T>(), p == INFINITY ? idx.data_ptr<int64_t>() : nullptr, nullptr, nullptr);
}

std::tuple<Tensor, Tensor> lp_dist_cpu_forward(const Tensor& x, const Tensor& w, double p) {
  check_inputs(x, w, p, "drp::lp_dist_cpu_forward");
  const auto cd = compute_dtype(x, w);
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1);
  Tensor out = at::empty({B, N}, x.options().dtype(cd));
  Tensor idx = at::empty({p == INFINITY ? B : 0, p == INFINITY ? N : 0}, x.options().dtype(at::kLong));
  if (B == 0 || N == 0) return {out, idx};
  if (D == 0) {
    out.zero_();
    idx.zero_();
    return {out, idx};
  }
  if (cd == at::kDouble) {
    forward_impl<double>(x, w, p, out, idx);
  } else {
    forward_impl<float>(x, w, p, out, idx);
  }
  return {out, idx};
}

// p = inf: a scatter-add of s[b, n] = sign(x[b, k] - w[n, k]) * grad[b, n] at k = idx[b, n].
// Pass 1 (blocks of n per task, w rows in cache) forms s and subtracts it from grad_w; pass 2
// (rows of x per task) adds it to grad_x, reading s sequentially.
template <typename T>
void backward_inf(const Tensor& g, const Tensor& xc, const Tensor& wc, const Tensor& idx, Tensor& gx, Tensor& gw,
                  bool need_x, bool need_w) {
  const int64_t B = xc.size(0), N = wc.size(0), D = xc.size(1);
  const T* gp = g.data_ptr<T>();
  const T* xp = xc.data_ptr<T>();
  const T* wp = wc.data_ptr<T>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  Tensor sbuf = at::empty({B, N}, g.options());
  T* sp = sbuf.data_ptr<T>();
  T* gwp = need_w ? gw.data_ptr<T>() : nullptr;
  constexpr int64_t NBLK = 16;
  const int64_t nblocks = (N + NBLK - 1) / NBLK;
  const int64_t grain1 = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, 16 * NBLK * B));
  at::parallel_for(0, nblocks, grain1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * NBLK, n1 = std::min<int64_t>(N, n0 + NBLK);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t k = ip[b * N + n];
          const T d = xp[b * D + k] - wp[n * D + k];
          const T s = (T(d > T(0)) - T(d < T(0))) * gp[b * N + n];
          sp[b * N + n] = s;
          if (gwp) gwp[n * D + k] -= s;
        }
    }
  });
  if (need_x) {
    T* gxp = gx.data_ptr<T>();
    const int64_t grain2 = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, 16 * N));
    at::parallel_for(0, B, grain2, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t n = 0; n < N; ++n) gxp[b * D + ip[b * N + n]] += sp[b * N + n];
    });
  }
}

template <typename T>
void backward_finite(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& out, double p, Tensor& gx,
                     Tensor& gw) {
  const Isa<T> isa = pick_isa<T>();
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1);
  const int64_t Dp = round_up(D, isa.lanes), Np = round_up(N, isa.brn);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t work = B * N * D * 2;
  int64_t chunks = work < kSerialWork ? 1 : threads;
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, kPartialBytes / (Np * Dp * int64_t(sizeof(T)))));
  chunks = std::min<int64_t>(chunks, (B + isa.brb - 1) / isa.brb);
  const int64_t rows = round_up((B + chunks - 1) / chunks, isa.brb);
  chunks = (B + rows - 1) / rows;
  const int64_t Bp = rows * chunks;
  // documented copies: padded row-major x and w in the compute dtype, and the per-pair
  // coefficient grad[b, n] and inverse distance 1 / out[b, n] transposed to (Np, Bp)
  Tensor xp = at::zeros({Bp, Dp}, opts);
  xp.narrow(0, 0, B).narrow(1, 0, D).copy_(x);
  Tensor wp = at::zeros({Np, Dp}, opts);
  wp.narrow(0, 0, N).narrow(1, 0, D).copy_(w);
  // per pair: the weight is sign(d) * c * (|d| * inv)^(p - 1). Moderate p: c = grad, inv = 1 / out.
  // Large p: 1 / out would carry out's rounding error amplified p - 1 times, so m = max |d| and
  // s = sum (|d| / m)^p are recomputed (two forward passes) and c = grad * s^((1 - p) / p), inv = 1 / m.
  Tensor c, inv;
  const Tensor gc = g.to(opts.dtype());
  if (p > kRecomputeP) {
    Tensor m = at::empty({B, N}, opts), s = at::empty({B, N}, opts), o = at::empty({B, N}, opts);
    run_tiles<T>(x, w, p, o.data_ptr<T>(), nullptr, m.data_ptr<T>(), s.data_ptr<T>());
    const Tensor usable = (m > 0) & m.isfinite();
    const Tensor sd = s.to(at::kDouble);
    c = at::where(usable, gc * sd.pow((1.0 - p) / p).to(opts.dtype()), at::zeros({}, opts));
    c = at::where(m.isnan() | o.isnan(), at::full({}, NAN, opts), c);
    inv = at::where(usable, m.reciprocal(), at::zeros({}, opts));
  } else {
    const Tensor o = out.to(opts.dtype());
    const Tensor zero_out = o == 0;
    c = at::where(zero_out, at::zeros({}, opts), gc);
    inv = at::where(zero_out | o.isinf(), at::zeros({}, opts), o.reciprocal());
  }
  Tensor cT = at::zeros({Np, Bp}, opts);
  cT.narrow(0, 0, N).narrow(1, 0, B).copy_(c.t());
  Tensor iT = at::zeros({Np, Bp}, opts);
  iT.narrow(0, 0, N).narrow(1, 0, B).copy_(inv.t());
  Tensor gxp = at::zeros({Bp, Dp}, opts);
  Tensor parts = at::empty({chunks, Np, Dp}, opts);
  const PowPlan plan = make_plan(p);
  const T* xd = xp.data_ptr<T>();
  const T* wd = wp.data_ptr<T>();
  const T* cd = cT.data_ptr<T>();
  const T* id = iT.data_ptr<T>();
  T* gxd = gxp.data_ptr<T>();
  T* pd = parts.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch)
      isa.bwd(xd, wd, cd, id, ch * rows, (ch + 1) * rows, Bp, Np, Dp, gxd, pd + ch * Np * Dp, p, plan);
  });
  gx = gxp.narrow(0, 0, B).narrow(1, 0, D);
  gw = (chunks == 1 ? parts[0] : parts.sum(0)).narrow(0, 0, N).narrow(1, 0, D);
}

std::tuple<Tensor, Tensor> lp_dist_cpu_backward(const Tensor& grad, const Tensor& x, const Tensor& w,
                                                const Tensor& out, const Tensor& idx, double p, bool need_x,
                                                bool need_w) {
  check_inputs(x, w, p, "drp::lp_dist_cpu_backward");
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == N,
                    "drp::lp_dist_cpu_backward: grad must have shape (", B, ", ", N, "), got ", grad.sizes());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == B && out.size(1) == N,
                    "drp::lp_dist_cpu_backward: out must have shape (", B, ", ", N, "), got ", out.sizes());
  if (p == INFINITY) {
    TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == B && idx.size(1) == N && idx.scalar_type() == at::kLong,
                      "drp::lp_dist_cpu_backward: idx must be int64 of shape (", B, ", ", N, ") for p = inf");
  }
  const auto cd = compute_dtype(x, w);
  const auto opts = x.options().dtype(cd);
  Tensor gx, gw;
  if (B == 0 || N == 0 || D == 0 || (!need_x && !need_w)) {
    gx = at::zeros({B, D}, opts);
    gw = at::zeros({N, D}, opts);
  } else if (p == INFINITY) {
    gx = at::zeros({B, D}, opts);
    gw = at::zeros({N, D}, opts);
    const Tensor g = grad.to(cd).contiguous();
    const Tensor xc = x.to(cd).contiguous();
    const Tensor wc = w.to(cd).contiguous();
    const Tensor ic = idx.contiguous();
    if (cd == at::kDouble) {
      backward_inf<double>(g, xc, wc, ic, gx, gw, need_x, need_w);
    } else {
      backward_inf<float>(g, xc, wc, ic, gx, gw, need_x, need_w);
    }
  } else if (cd == at::kDouble) {
    backward_finite<double>(grad, x, w, out, p, gx, gw);
  } else {
    backward_finite<float>(grad, x, w, out, p, gx, gw);
  }
  Tensor rx = need_x ? gx.to(x.scalar_type()).contiguous() : at::empty({0}, x.options());
  Tensor rw = need_w ? gw.to(w.scalar_type()).contiguous() : at::empty({0}, w.options());
  return {rx, rw};
}

}  // namespace
}  // namespace lpd
}  // namespace drp

TORCH_LIBRARY_FRAGMENT(drp, m) {
  m.def("lp_dist_cpu_forward(Tensor x, Tensor w, float p) -> (Tensor, Tensor)");
  m.def(
      "lp_dist_cpu_backward(Tensor grad, Tensor x, Tensor w, Tensor out, Tensor idx, float p, bool need_x, "
      "bool need_w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(drp, CPU, m) {
  m.impl("lp_dist_cpu_forward", &drp::lpd::lp_dist_cpu_forward);
  m.impl("lp_dist_cpu_backward", &drp::lpd::lp_dist_cpu_backward);
}
