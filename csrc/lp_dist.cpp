// drp_kernels.ops._C: the all-pairs lp distance out[b, n] = (sum_k |x[b, k] - w[n, k]|^p)^(1/p)
// on the CPU, forward and fused backward, for p in [1, inf].
//
// Schemas: TORCH_LIBRARY_FRAGMENT(drp, m) (the library itself is defined in drp.cpp).
//   lp_dist_cpu_forward(x, w, p, stats) -> (out, idx, inv, r)
//     idx: (B, N) first arg-max k for p = inf with stats; (B, N, W) int64 for the sparse scheme
//          (p > 24) with stats: the chunk map (bit c of pair (b, n): chunk c of 8 coordinates may
//          hold a term that matters; W = ceil(ceil(D / 8) / 64)); else (0, 0)
//     inv, r: (B, N) for finite p > 1 with stats, else (0, 0): what the backward needs (below)
//   lp_dist_cpu_backward(grad, x, w, out, idx, inv, r, p, need_x, need_w) -> (grad_x, grad_w)
// The autograd wiring and the Triton (CUDA) path live in drp_kernels/ops/lp_dist.py.
//
// Arithmetic: float32 for float32/float16/bfloat16 inputs, float64 when either input is float64.
// Finite p > 1 runs one of two schemes, chosen per call:
//   * pre-scaled, one pass (p <= kSinglePassMaxP): x and w are copied scaled by one power of two
//     2^-e (exact), chosen so every |d| <= 1; then out = 2^e (sum_k |d'_k|^p)^(1/p) needs no
//     per-pair maximum and no per-element scaling. A tile where some pair's sum falls below 2^-60
//     (its distance is tiny next to the largest input, so terms could be lost to underflow) is
//     redone with the second scheme.
//   * two passes, as an online softmax is scaled: m = max_k |d_k|, then out = m (sum_k (|d_k| / m)^p)^(1/p),
//     so p = 1e6 neither overflows nor underflows.
// Integer powers are square-and-multiply over a whole register tile; a non-integer p uses a vector
// exp2(p log2 t) in float (polynomials, ~1e-7 relative) and std::pow lane by lane in double. The
// root s^(1/p) is computed in double vectors (lp_dist_kernels.h, dpow_pos). Every worker runs with
// FTZ/DAZ set (FlushDenormals) and restores the caller's MXCSR: a term that leaves the normal range
// is below 2^-66 of the sum and becomes 0 at no cost.
//
// The backward needs one pass: the forward saves, per pair, the scale inv it used (1 / m, or 1 in
// the pre-scaled scheme) and r = s^((1 - p) / p), so the weight of coordinate k is
// c * sign(d_k) |d_k * inv|^(p - 1) with c = grad * r, bit for bit the scaling the forward used.
// p = inf saves the arg-max index instead: the backward is a scatter-add of sign(d) * grad.
// p = 1 needs nothing: the weight is sign(d).
//
// Non-finite input: a pair with a NaN has distance NaN, else a pair with an infinite coordinate has
// distance inf. Finite p: every coordinate of such a pair's rows gets a NaN gradient (the formula
// is undefined there). p = inf: the gradient sits at the first arg-max, where NaN counts as the
// largest value, so it is NaN for a NaN pair and sign(d) * grad for an infinite one.
//
// Blocking (a GEMM's): the forward copies w once, zero-padded and transposed panel by panel (each
// panel of NV * lanes rows of w a contiguous (D, NV * lanes) block), and x to a padded (Bp, D) buffer
// of the compute dtype (documented copies, O((B + N) D)). A task owns MB
// rows of x times one panel of NV * lanes columns of wT; inside, micro-kernels keep an R x (NV *
// lanes) accumulator tile in registers while they walk k, reusing every loaded w vector for R
// rows. The backward works on padded row-major copies and splits the rows of x into one chunk per
// thread: each chunk owns its rows of grad_x and writes its own partial grad_w (N x D), summed at
// the end, so no B x N x D buffer and no atomics exist.
//
// Above p = 24 a sparse scheme runs instead (lp_dist_kernels.h, fwd_sparse_gated / bwd_sparse): only the
// terms above 2^-40 of the pair's largest (DRP_LP_DIST_SKIP_BITS, 0 = all of them), in double.
// With stats its forward also returns which chunks of 8 coordinates of each pair may hold such a
// term; where at most 1 in 16 chunks of the pairs with a gradient are flagged, the backward visits
// only those, pair by pair (bwd_pairs), instead of scanning every block (AVX-512 above p = 256: 1 in 2).
//
// SIMD: csrc/lp_dist_kernels.h is compiled three times (AVX-512, AVX2 + FMA, baseline) and the
// widest copy the CPU supports runs; DRP_CPU_ISA=avx512|avx2|generic forces one. GCC and Clang
// build all three on x86-64; other targets build the portable vector-extension copy.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
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
#include <vector>

#include "lp_dist_plan.h"

namespace drp {
namespace lpd {

using at::Tensor;

// The flush-to-zero / denormals-are-zero mode for one worker, restoring the caller's MXCSR.
struct FlushDenormals {
#ifdef LPD_X86_COPIES
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

#ifdef LPD_X86_COPIES
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#endif
#define LPD_NS avx512
#define LPD_VB 64
#define LPD_ISA 512
#define LPD_RB 4
#define LPD_RBI 4
#define LPD_RBS 4
#define LPD_NV 2
#define LPD_BRB 4
#define LPD_BRN 4
#include "lp_dist_kernels.h"  // undefines the LPD_* parameters at its end
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define LPD_NS avx2
#define LPD_VB 32
#define LPD_ISA 256
#define LPD_RB 4
#define LPD_RBI 2
#define LPD_RBS 2
#define LPD_NV 2
#define LPD_BRB 2
#define LPD_BRN 4
#include "lp_dist_kernels.h"  // undefines the LPD_* parameters at its end
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // LPD_X86_COPIES

#define LPD_NS generic
#define LPD_VB 16
#ifdef LPD_X86_COPIES
#define LPD_ISA 128
#else
#define LPD_ISA 0
#endif
#define LPD_RB 4
#define LPD_RBI 2
#define LPD_RBS 2
#define LPD_NV 2
#define LPD_BRB 2
#define LPD_BRN 4
#include "lp_dist_kernels.h"  // undefines the LPD_* parameters at its end


namespace {

// Work (element operations) below which an op runs on the calling thread only.
constexpr int64_t kSerialWork = int64_t(1) << 20;
// The pre-scaled one-pass scheme is used up to this p (see the file comment).
constexpr double kSinglePassMaxP = 16.0;
// Above this p the sparse double-precision scheme runs (lp_dist_kernels.h, fwd_sparse_gated).
constexpr double kSparseMinP = 24.0;
// Up to this p a sparse tile with many terms near its maxima may run the dense float pass: its
// output error stays below 1e-6 and its gradient error, about (p - 1) times float's rounding of d,
// within the 1e-5 contract (7.8e-6 norm-wise at p = 256 on the Gaussian pairs of
// tests/kernels/test_lp_dist.py, test_power_chains_meet_the_accuracy_contract).
constexpr double kDenseMaxP = 256.0;
// Cap on the per-thread partial grad_w buffers of the backward.
constexpr int64_t kPartialBytes = int64_t(512) << 20;

template <typename T>
struct Isa {
  const char* name;
  int lanes, rt, nv, brb, brn;
  void (*fwd)(const Plan&, const T*, int64_t, const T*, int64_t, int64_t, int, int, T*, int64_t*, T*, T*,
              uint32_t*);
  void (*bwd)(const Plan&, const T*, const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,
              int64_t, T*, T*, uint32_t*);
  void (*bwd_pairs)(const T*, const T*, int64_t, const int64_t*, int64_t, const T*, const T*, const T*, int64_t,
                    int64_t, int64_t, double*, double*, unsigned, double, bool);
};

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


#define LPD_ISA_OF(NS, T, SUF) \
  Isa<T> { #NS, NS::Vec<T>::L, NS::kRT, NS::NV, NS::BRB, NS::BRN, &NS::fwd_##SUF, &NS::bwd_##SUF, &NS::bwdp_##SUF }

template <typename T>
Isa<T> pick_isa();
template <>
Isa<float> pick_isa<float>() {
  const std::string c = isa_choice();
#ifdef LPD_X86_COPIES
  if (c == "avx512") return LPD_ISA_OF(avx512, float, f32);
  if (c == "avx2") return LPD_ISA_OF(avx2, float, f32);
#endif
  return LPD_ISA_OF(generic, float, f32);
}
template <>
Isa<double> pick_isa<double>() {
  const std::string c = isa_choice();
#ifdef LPD_X86_COPIES
  if (c == "avx512") return LPD_ISA_OF(avx512, double, f64);
  if (c == "avx2") return LPD_ISA_OF(avx2, double, f64);
#endif
  return LPD_ISA_OF(generic, double, f64);
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

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

// Whether p runs the sparse scheme (make_plan), and the words of its chunk map per pair: one bit
// per chunk of kSparseChunk coordinates (drp_kernels/ops/lp_dist.py mirrors both for fake tensors).
bool sparse_p(double p) { return std::isfinite(p) && p > kSparseMinP; }
int64_t sparse_chunks(int64_t D) { return (D + kSparseChunk - 1) / kSparseChunk; }
int64_t map_words(int64_t D) { return (sparse_chunks(D) + 63) / 64; }

// The sparse scheme skips the terms below 2^-bits of a pair's largest one: DRP_LP_DIST_SKIP_BITS,
// default 40; 0 computes every term (the dense reference of the scheme, for tests).
double skip_bits() {
  const char* env = std::getenv("DRP_LP_DIST_SKIP_BITS");
  if (!env || !*env) return 40.0;
  char* end = nullptr;
  const double v = std::strtod(env, &end);
  TORCH_CHECK_VALUE(end && *end == '\0' && v >= 0.0 && v <= 1000.0,
                    "DRP_LP_DIST_SKIP_BITS must be a number in [0, 1000] (default 40); got '", env, "'");
  return v;
}

// The plan of a call: a pure function of (x, w, p, stats), so the backward re-derives the forward's
// scale exactly. The pre-scaled scheme needs finite inputs whose largest |x| + |w| lies well inside
// the range (2^-100 .. 2^100): the scale 2^e >= max|x| + max|w| keeps every |d / 2^e| <= 1.
Plan make_plan(const Tensor& x, const Tensor& w, double p, bool stats) {
  Plan pl{p, kTwoPass, kFwdReal, kBwdReal, 0, 1.0, stats, false, false, 0.0, false};
  const bool integer = std::isfinite(p) && p == std::floor(p) && p <= 1.0e6;
  pl.integer = integer;
  if (integer) pl.e = static_cast<unsigned>(p);
  if (sparse_p(p)) {
    pl.sparse = true;
    const double bits = skip_bits();
    pl.thr = bits > 0.0 ? std::exp2(-bits / (p - 1.0)) : 0.0;
    pl.dense_ok = p <= kDenseMaxP && bits > 0.0;
  }
  if (p == INFINITY) {
    pl.kind = kInf;
    return pl;
  }
  if (p == 1.0) {
    pl.kind = kOne;
    pl.bwd_pow = kBwdSign;
    return pl;
  }
  if (integer) {
    const bool even = pl.e % 2 == 0;
    pl.fwd_pow = pl.e == 2 ? kFwd2 : (pl.e == 8 ? kFwd8 : (even ? kFwdIntEven : kFwdIntOdd));
    pl.bwd_pow = pl.e == 2 ? kBwd1 : (pl.e == 8 ? kBwd7 : (even ? kBwdIntOdd : kBwdIntEven));
  }
  if (p <= kSinglePassMaxP && x.numel() > 0 && w.numel() > 0) {
    const double mx = x.abs().max().item<double>();
    const double mw = w.abs().max().item<double>();
    const double top = mx + mw;
    if (std::isfinite(top) && top > 0x1p-100 && top < 0x1p100) {
      pl.kind = kSingle;
      pl.scale = std::exp2(std::ceil(std::log2(top)));
    }
  }
  return pl;
}

// Padded copy of t (R, D) into (Rp, Dp) of the compute dtype, divided by scale (a power of two: exact).
template <typename T>
Tensor padded_copy(const Tensor& t, int64_t Rp, int64_t Dp, double scale) {
  const auto opts = t.options().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t R = t.size(0), D = t.size(1);
  Tensor out = at::zeros({Rp, Dp}, opts);
  Tensor view = out.narrow(0, 0, R).narrow(1, 0, D);
  view.copy_(t);
  if (scale != 1.0) view.mul_(1.0 / scale);
  return out;
}

// out = NaN (and idx = the first NaN coordinate, r = NaN) for every pair whose rows hold a NaN: the
// SIMD max ignores NaN, so these pairs are patched here (O((B + N) D) to find them).
template <typename T>
void patch_nan_rows(const Tensor& x, const Tensor& w, T* out, int64_t* idx, T* inv, T* r) {
  // max() propagates NaN: one pass over the inputs without a mask tensor in the common case
  if (!std::isnan(x.max().item<double>()) && !std::isnan(w.max().item<double>())) return;
  const Tensor xn = x.isnan().any(1), wn = w.isnan().any(1);
  const Tensor xc = x.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const Tensor wc = w.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1);
  const bool* xb = xn.data_ptr<bool>();
  const bool* wb = wn.data_ptr<bool>();
  const T* xp = xc.data_ptr<T>();
  const T* wp = wc.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      if (!xb[b] && !wb[n]) continue;
      out[b * N + n] = std::numeric_limits<T>::quiet_NaN();
      if (inv) {
        inv[b * N + n] = T(0);
        r[b * N + n] = std::numeric_limits<T>::quiet_NaN();
      }
      if (idx) {
        for (int64_t k = 0; k < D; ++k)
          if (std::isnan(xp[b * D + k] - wp[n * D + k])) {
            idx[b * N + n] = k;
            break;
          }
      }
    }
}

// Runs the forward tiles: out (B, N); with stats idx (p = inf) or inv and r (finite p > 1).
template <typename T>
void run_forward(const Tensor& x, const Tensor& w, const Plan& pl, T* op, int64_t* ip, T* invp, T* rp) {
  const Isa<T> isa = pick_isa<T>();
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1);
  const int64_t RT = isa.rt, NB = isa.nv * isa.lanes;
  const int64_t Bp = round_up(B, RT), Np = round_up(N, NB);
  // documented copies: x in the compute dtype, padded to whole row tiles; w padded and stored panel
  // by panel, each (D, NB) transposed and contiguous, so a tile streams its panel sequentially (a
  // (D, Np) layout would read it with a stride of Np floats, which aliases in the L1 cache for
  // N = 512 and more)
  const Tensor xc = padded_copy<T>(x, Bp, D, pl.scale);
  const Tensor wP = padded_copy<T>(w, Np, D, pl.scale).view({Np / NB, NB, D}).transpose(1, 2).contiguous();
  const T* xp = xc.data_ptr<T>();
  const T* wp = wP.data_ptr<T>();

  // words per pair of the sparse scheme's chunk map (what ip holds then), else 1 (the arg-max)
  const int64_t MW = pl.kind == kInf ? 1 : map_words(D);
  const int64_t MB = RT * std::max<int64_t>(1, 64 / RT);
  const int64_t nbb = (Bp + MB - 1) / MB, npan = Np / NB;
  const int64_t passes = pl.kind == kTwoPass ? 3 : (pl.kind == kSingle ? 2 : 1);
  const int64_t task_work = MB * NB * std::max<int64_t>(D, 1) * passes;
  const int64_t grain = std::max<int64_t>(1, kSerialWork / task_work);
  at::parallel_for(0, nbb * npan, grain, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    std::vector<T> tile(RT * NB), tinv(RT * NB), tr(RT * NB);
    std::vector<int64_t> tidx(RT * NB * std::max<int64_t>(MW, 1));
    // the sparse scheme's chunk maxima (nc * RT * NB values), then its lists of (chunk, vector)
    // pairs and of (coordinate, vector, half) entries (at most 2 halves per vector)
    const int64_t nc = sparse_chunks(D);
    std::vector<uint32_t> scratch(
        pl.sparse ? nc * RT * NB * int64_t(sizeof(T) / sizeof(uint32_t)) + nc * RT * isa.nv * (2 * kSparseChunk + 1) : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bb = t / npan, pan = t % npan;
      const int64_t n0 = pan * NB, ncols = std::min<int64_t>(NB, N - n0);
      const int64_t bend = std::min<int64_t>(Bp, (bb + 1) * MB);
      for (int64_t b = bb * MB; b < bend && b < B; b += RT) {
        const int64_t nrows = std::min<int64_t>(RT, B - b);
        isa.fwd(pl, xp + b * D, D, wp + pan * D * NB, NB, D, static_cast<int>(nrows), static_cast<int>(ncols), tile.data(),
                ip ? tidx.data() : nullptr, invp ? tinv.data() : nullptr, invp ? tr.data() : nullptr, scratch.data());
        for (int64_t r = 0; r < nrows; ++r) {
          std::memcpy(op + (b + r) * N + n0, tile.data() + r * NB, ncols * sizeof(T));
          if (ip) std::memcpy(ip + ((b + r) * N + n0) * MW, tidx.data() + r * NB * MW, ncols * MW * sizeof(int64_t));
          if (invp) {
            std::memcpy(invp + (b + r) * N + n0, tinv.data() + r * NB, ncols * sizeof(T));
            std::memcpy(rp + (b + r) * N + n0, tr.data() + r * NB, ncols * sizeof(T));
          }
        }
      }
    }
  });
  patch_nan_rows<T>(x, w, op, pl.kind == kInf ? ip : nullptr, invp, rp);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lp_dist_cpu_forward(const Tensor& x, const Tensor& w, double p,
                                                                bool stats) {
  check_inputs(x, w, p, "drp::lp_dist_cpu_forward");
  const auto cd = compute_dtype(x, w);
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1);
  const bool want_idx = stats && p == INFINITY;
  const bool want_map = stats && sparse_p(p);
  const bool want_ir = stats && p != INFINITY && p != 1.0;
  Tensor out = at::empty({B, N}, x.options().dtype(cd));
  Tensor idx = want_map ? at::empty({B, N, map_words(D)}, x.options().dtype(at::kLong))
                        : at::empty({want_idx ? B : 0, want_idx ? N : 0}, x.options().dtype(at::kLong));
  Tensor inv = at::empty({want_ir ? B : 0, want_ir ? N : 0}, x.options().dtype(cd));
  Tensor r = at::empty({want_ir ? B : 0, want_ir ? N : 0}, x.options().dtype(cd));
  if (B == 0 || N == 0) return {out, idx, inv, r};
  if (D == 0) {
    out.zero_();
    idx.zero_();
    inv.zero_();
    r.zero_();
    return {out, idx, inv, r};
  }
  const Plan pl = make_plan(x, w, p, stats);
  if (cd == at::kDouble) {
    run_forward<double>(x, w, pl, out.data_ptr<double>(), want_idx || want_map ? idx.data_ptr<int64_t>() : nullptr,
                        want_ir ? inv.data_ptr<double>() : nullptr, want_ir ? r.data_ptr<double>() : nullptr);
  } else {
    run_forward<float>(x, w, pl, out.data_ptr<float>(), want_idx || want_map ? idx.data_ptr<int64_t>() : nullptr,
                       want_ir ? inv.data_ptr<float>() : nullptr, want_ir ? r.data_ptr<float>() : nullptr);
  }
  return {out, idx, inv, r};
}

// p = inf: a scatter-add of s[b, n] = sign(x[b, k] - w[n, k]) * grad[b, n] at k = idx[b, n] (NaN
// where that coordinate is NaN). Pass 1 (blocks of n per task, w rows in cache) forms s and subtracts
// it from grad_w; pass 2 (rows of x per task) adds it to grad_x, reading s sequentially.
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
          const T sg = d != d ? d : T(d > T(0)) - T(d < T(0));
          const T s = sg * gp[b * N + n];
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


// The flagged chunks of the pairs with a gradient are few enough (at most 1 in `ratio`) for the pair
// by pair backward (backward_pairs); else the blocked one is cheaper. The crossing depends on the
// vector width: with AVX-512 a chunk of 8 coordinates is one double vector for bwd_pairs, while
// the blocked scan still touches every block, so the pairs win up to half the chunks flagged (the
// trained 5-layer net at p = 1000: its deepest layer's backward 60 -> 32 ms on one Xeon thread, 10-20%
// of the chunks flagged). That holds above kDenseMaxP, where no forward tile runs densely; up to it
// (and with AVX2 or narrower, where a chunk is two or more vectors) 1 in 16 stays.
constexpr int64_t kPairsRatioAvx512 = 2;
constexpr int64_t kPairsRatioNarrow = 16;
template <typename T>
bool few_chunks(const Tensor& map, const Tensor& c, int64_t D, int64_t ratio) {
  const int64_t B = map.size(0), N = map.size(1), W = map.size(2);
  const Tensor cc = c.contiguous(), mc = map.contiguous();
  const int64_t* mp = mc.data_ptr<int64_t>();
  const T* cp = cc.data_ptr<T>();
  int64_t flagged = 0;
  for (int64_t i = 0; i < B * N; ++i)
    if (cp[i] != T(0))
      for (int64_t k = 0; k < W; ++k) flagged += __builtin_popcountll(static_cast<uint64_t>(mp[i * W + k]));
  return flagged * ratio <= B * N * sparse_chunks(D);
}

// The sparse scheme's backward pair by pair from the forward's chunk map (lp_dist_kernels.h,
// bwd_pairs): rows of x split among the workers, each with its own partial grad_w, in double.
template <typename T>
void backward_pairs(const Isa<T>& isa, const Plan& pl, const Tensor& x, const Tensor& w, const Tensor& map,
                    const Tensor& c, const Tensor& iv, const Tensor& th, Tensor& gx, Tensor& gw) {
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1), W = map.size(2);
  const int64_t ld = round_up(D, kSparseChunk);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  const auto dopts = x.options().dtype(at::kDouble);
  // documented copies: x and w row-major, zero-padded to whole chunks
  const Tensor xr = padded_copy<T>(x, B, ld, pl.scale);
  const Tensor wr = padded_copy<T>(w, N, ld, pl.scale);
  const Tensor cc = c.contiguous(), ivc = iv.contiguous(), thc = th.contiguous(), mc = map.contiguous();
  int64_t parts_n = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), B);
  parts_n = std::max<int64_t>(1, std::min<int64_t>(parts_n, kPartialBytes / (N * ld * int64_t(sizeof(double)))));
  const int64_t rows = (B + parts_n - 1) / parts_n;
  parts_n = (B + rows - 1) / rows;
  Tensor gxd = at::zeros({B, ld}, dopts);
  Tensor parts = at::zeros({parts_n, N, ld}, dopts);
  const unsigned e1 = pl.e > 0 ? pl.e - 1 : 0;
  at::parallel_for(0, parts_n, 1, [&](int64_t c0, int64_t c1) {
    FlushDenormals ftz;
    for (int64_t ch = c0; ch < c1; ++ch)
      isa.bwd_pairs(xr.data_ptr<T>(), wr.data_ptr<T>(), ld, mc.data_ptr<int64_t>(), W, cc.data_ptr<T>(),
                    ivc.data_ptr<T>(), thc.data_ptr<T>(), N, ch * rows, std::min<int64_t>(B, (ch + 1) * rows),
                    gxd.data_ptr<double>(), parts.data_ptr<double>() + ch * N * ld, e1, pl.p - 1.0, pl.integer);
  });
  gx = gxd.narrow(1, 0, D).to(opts.dtype());
  gw = (parts_n == 1 ? parts[0] : parts.sum(0)).narrow(1, 0, D).to(opts.dtype());
}

// The blocked backward (lp_dist_kernels.h, bwd): rows of x split into chunks of `rows`, each with
// its own partial grad_w.
template <typename T>
void backward_blocks(const Isa<T>& isa, const Plan& pl, const Tensor& x, const Tensor& w, const Tensor& c_ok,
                     const Tensor& iv, const Tensor& th, int64_t B, int64_t N, int64_t D, int64_t Bp, int64_t Np, int64_t Dp,
                     int64_t rows, int64_t chunks, Tensor& gx, Tensor& gw) {
  const int64_t L = isa.lanes;
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  // documented copies: padded x and w in the compute dtype (divided by the forward's scale), k-block
  // major ((Dp / L, rows, L): the rows of one block of L coordinates are contiguous, so the kernels
  // read them sequentially), and the per-pair coefficient c = grad * r, scale inv and the sparse
  // scheme's threshold transposed to (Np, Bp)
  const Tensor xp = padded_copy<T>(x, Bp, Dp, pl.scale).view({Bp, Dp / L, L}).transpose(0, 1).contiguous();
  const Tensor wp = padded_copy<T>(w, Np, Dp, pl.scale).view({Np, Dp / L, L}).transpose(0, 1).contiguous();
  Tensor cT = at::zeros({Np, Bp}, opts);
  cT.narrow(0, 0, N).narrow(1, 0, B).copy_(c_ok.t());
  Tensor iT = at::zeros({Np, Bp}, opts);
  iT.narrow(0, 0, N).narrow(1, 0, B).copy_(iv.t());
  Tensor tT;
  if (pl.sparse) {
    tT = at::full({Np, Bp}, INFINITY, opts);
    tT.narrow(0, 0, N).narrow(1, 0, B).copy_(th.t());
  }
  Tensor gxp = at::zeros({Dp / L, Bp, L}, opts);
  Tensor parts = at::empty({chunks, Dp / L, Np, L}, opts);
  const T* xd = xp.data_ptr<T>();
  const T* wd = wp.data_ptr<T>();
  const T* cd = cT.data_ptr<T>();
  const T* id = iT.data_ptr<T>();
  const T* td = pl.sparse ? tT.data_ptr<T>() : nullptr;
  T* gxd = gxp.data_ptr<T>();
  T* pd = parts.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    FlushDenormals ftz;
    std::vector<uint32_t> scratch(pl.sparse ? rows * (1 + 2 * isa.brn) : 0);
    for (int64_t ch = c0; ch < c1; ++ch)
      isa.bwd(pl, xd, wd, cd, id, td, ch * rows, (ch + 1) * rows, Bp, Np, Dp, gxd, pd + ch * Np * Dp,
              scratch.data());
  });
  gx = gxp.transpose(0, 1).reshape({Bp, Dp}).narrow(0, 0, B).narrow(1, 0, D);
  gw = (chunks == 1 ? parts[0] : parts.sum(0)).transpose(0, 1).reshape({Np, Dp}).narrow(0, 0, N).narrow(1, 0, D);
}

// The common end of the finite-p backward: the pairs the pre-scaled scheme redid (in double), and
// NaN rows for the pairs with a non-finite coefficient.
template <typename T>
void finish_backward(const Tensor& x, const Tensor& w, const Tensor& c, const Tensor& iv, const Tensor& bad,
                     const Tensor& redo, const Plan& pl, double p, Tensor& gx, Tensor& gw) {
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  if (redo.defined() && redo.size(0) > 0) {
    const Tensor bi = redo.select(1, 0), ni = redo.select(1, 1);
    const Tensor d = (x.index_select(0, bi).to(at::kDouble) - w.index_select(0, ni).to(at::kDouble)) / pl.scale;
    const Tensor t = d.abs() * iv.index({bi, ni}).to(at::kDouble).unsqueeze(1);
    const Tensor g = (c.index({bi, ni}).to(at::kDouble).unsqueeze(1) * d.sign() * t.pow(p - 1.0)).to(opts.dtype());
    gx.index_add_(0, bi, g);
    gw.index_add_(0, ni, -g);
  }
  if (bad.any().item<bool>()) {
    gx = gx.clone();
    gx.index_put_({bad.any(1)}, NAN);
    gw = gw.clone();
    gw.index_put_({bad.any(0)}, NAN);
  }
}

// Finite p: one pass with the forward's inv and r (p = 1: sign only, c = grad, NaN where out is not
// finite).
template <typename T>
void backward_finite(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& out, const Tensor& map,
                     const Tensor& inv, const Tensor& r, double p, Tensor& gx, Tensor& gw) {
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
  const Plan pl = make_plan(x, w, p, true);
  const Tensor gc = g.to(opts.dtype());
  Tensor c, iv;
  if (p == 1.0) {
    c = at::where(out.isfinite(), gc, at::full({}, NAN, opts));
    iv = at::zeros({B, N}, opts);
  } else {
    c = gc * r.to(opts.dtype());
    iv = inv.to(opts.dtype());
  }
  // pairs with a non-finite coefficient (NaN / infinite distance) give NaN rows, set at the end
  const Tensor bad = c.isfinite().logical_not();
  Tensor c_ok = at::where(bad, at::zeros({}, opts), c);
  // the pre-scaled scheme's kernels assume inv = 1; the pairs its forward redid with two passes
  // (inv = 1 / max) are added at the end, in double, and left out of the kernels
  Tensor redo;
  if (pl.kind == kSingle) {
    redo = ((iv != 1) & (c_ok != 0)).nonzero();
    if (redo.size(0) > 0) c_ok = c_ok.index_put({redo.select(1, 0), redo.select(1, 1)}, at::zeros({}, opts));
  }
  // the sparse scheme's per-pair threshold thr * max = thr / inv (never passed where inv is 0)
  Tensor th;
  if (pl.sparse) th = at::where(iv > 0, pl.thr / iv, at::full({}, INFINITY, opts));
  const int64_t ratio =
      std::strcmp(isa.name, "avx512") == 0 && !pl.dense_ok ? kPairsRatioAvx512 : kPairsRatioNarrow;
  if (pl.sparse && map.numel() > 0 && few_chunks<T>(map, c_ok, D, ratio)) {
    backward_pairs<T>(isa, pl, x, w, map, c_ok, iv, th, gx, gw);
  } else {
    backward_blocks<T>(isa, pl, x, w, c_ok, iv, th, B, N, D, Bp, Np, Dp, rows, chunks, gx, gw);
  }
  finish_backward<T>(x, w, c, iv, bad, redo, pl, p, gx, gw);
}

void check_pair_tensor(const Tensor& t, int64_t B, int64_t N, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == N, "drp::lp_dist_cpu_backward: ", name,
                    " must have shape (", B, ", ", N, ") (the forward's stats), got ", t.sizes());
}

std::tuple<Tensor, Tensor> lp_dist_cpu_backward(const Tensor& grad, const Tensor& x, const Tensor& w,
                                                const Tensor& out, const Tensor& idx, const Tensor& inv,
                                                const Tensor& r, double p, bool need_x, bool need_w) {
  check_inputs(x, w, p, "drp::lp_dist_cpu_backward");
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1);
  check_pair_tensor(grad, B, N, "grad");
  check_pair_tensor(out, B, N, "out");
  const bool empty = B == 0 || N == 0 || D == 0 || (!need_x && !need_w);
  if (!empty && p == INFINITY) {
    TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong, "drp::lp_dist_cpu_backward: idx must be int64 for p = inf");
    check_pair_tensor(idx, B, N, "idx");
  } else if (!empty && p != 1.0) {
    check_pair_tensor(inv, B, N, "inv");
    check_pair_tensor(r, B, N, "r");
    if (sparse_p(p) && idx.numel() > 0)
      TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong && idx.dim() == 3 && idx.size(0) == B && idx.size(1) == N &&
                            idx.size(2) == map_words(D),
                        "drp::lp_dist_cpu_backward: idx must be empty or the forward's chunk map, int64 of shape (",
                        B, ", ", N, ", ", map_words(D), ") at p = ", p, "; got ", idx.scalar_type(), " of shape ",
                        idx.sizes());
  }
  const auto cd = compute_dtype(x, w);
  const auto opts = x.options().dtype(cd);
  Tensor gx, gw;
  if (empty) {
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
    backward_finite<double>(grad, x, w, out, idx, inv, r, p, gx, gw);
  } else {
    backward_finite<float>(grad, x, w, out, idx, inv, r, p, gx, gw);
  }
  Tensor rx = need_x ? gx.to(x.scalar_type()).contiguous() : at::empty({0}, x.options());
  Tensor rw = need_w ? gw.to(w.scalar_type()).contiguous() : at::empty({0}, w.options());
  return {rx, rw};
}

}  // namespace
}  // namespace lpd
}  // namespace drp

TORCH_LIBRARY_FRAGMENT(drp, m) {
  m.def("lp_dist_cpu_forward(Tensor x, Tensor w, float p, bool stats) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lp_dist_cpu_backward(Tensor grad, Tensor x, Tensor w, Tensor out, Tensor idx, Tensor inv, Tensor r, "
      "float p, bool need_x, bool need_w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(drp, CPU, m) {
  m.impl("lp_dist_cpu_forward", &drp::lpd::lp_dist_cpu_forward);
  m.impl("lp_dist_cpu_backward", &drp::lpd::lp_dist_cpu_backward);
}
