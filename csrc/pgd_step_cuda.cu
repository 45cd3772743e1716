// CUDA kernels of the batched PGD step and of the random start. No torch
// headers (see pgd_step_cuda.cuh). Math in fp32 (fp64 for double tensors);
// every rounding is explicit (__f*_rn) so --use_fast_math cannot change results.
#include "pgd_step_cuda.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "pgd_math.h"

namespace drp {
namespace cuda {
namespace {

// ---------------------------------------------------------------- arithmetic
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }

// ------------------------------------------------------------------ storage
struct HalfCvt {
  static __host__ __device__ __forceinline__ float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __host__ __device__ __forceinline__ uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
struct BF16Cvt {
  static __host__ __device__ __forceinline__ float to_float(uint16_t b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __host__ __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// Storage type S, compute type A, load and the rounding store of the exactness rule.
template <typename S> struct Store;
template <> struct Store<float> {
  using A = float;
  static __device__ __forceinline__ A load(float v) { return v; }
  static __device__ __forceinline__ float store(A v, A, A, A) { return v; }
};
template <> struct Store<double> {
  using A = double;
  static __device__ __forceinline__ A load(double v) { return v; }
  static __device__ __forceinline__ double store(A v, A, A, A) { return v; }
};
template <> struct Store<__half> {
  using A = float;
  static __device__ __forceinline__ A load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(A v, A x, A lo, A hi) {
    return __ushort_as_half(round16_toward<HalfCvt>(v, x, lo, hi));
  }
};
template <> struct Store<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ A load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(A v, A x, A lo, A hi) {
    return __ushort_as_bfloat16(round16_toward<BF16Cvt>(v, x, lo, hi));
  }
};

template <typename S, int VEC>
struct alignas(sizeof(S) * VEC) Pack {
  S v[VEC];
};

template <typename A>
Budget<A> budget_of(const StepParams& p) {
  return Budget<A>{round_down_to<A>(p.eps),
                   static_cast<A>(p.alpha),
                   static_cast<const A*>(p.eps_ps),
                   static_cast<const A*>(p.alpha_ps),
                   p.active,
                   round_up_to<A>(p.lower),
                   round_down_to<A>(p.upper)};
}

// ------------------------------------------------------------------ linf step
template <typename A>
__device__ __forceinline__ A linf_value(A xa, A x, A g, A e, A a, A lo, A hi) {
  A n = add(xa, mul(a, sign_of(g)));
  n = clamp_nan(n, add_toward(x, -e), add_toward(x, e));
  return clamp_nan(n, lo, hi);
}

// One launch: grid-stride over packs of VEC elements (VEC = 1 when unaligned).
template <typename S, int VEC, bool PER_SAMPLE>
__global__ void linf_kernel(S* __restrict__ out, const S* __restrict__ x, const S* __restrict__ g, int64_t n,
                            int64_t D, Budget<typename Store<S>::A> bud) {
  using A = typename Store<S>::A;
  using P = Pack<S, VEC>;
  const int64_t npack = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < npack; p += stride) {
    const int64_t i0 = p * VEC;
    P po = reinterpret_cast<const P*>(out)[p];
    const P px = reinterpret_cast<const P*>(x)[p];
    const P pg = reinterpret_cast<const P*>(g)[p];
    A e = bud.eps, a = bud.alpha;
    bool on = true;
    int64_t b = 0, bound = 0;
    if (PER_SAMPLE) {
      b = i0 / D;
      bound = (b + 1) * D;
      e = bud.e(b), a = bud.a(b), on = bud.on(b);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (PER_SAMPLE && i0 + k >= bound) {  // VEC <= D: at most one boundary per pack
        ++b;
        bound += D;
        e = bud.e(b), a = bud.a(b), on = bud.on(b);
      }
      if (!PER_SAMPLE || on) {
        const A xv = Store<S>::load(px.v[k]);
        const A v = linf_value(Store<S>::load(po.v[k]), xv, Store<S>::load(pg.v[k]), e, a, bud.lower, bud.upper);
        po.v[k] = Store<S>::store(v, xv, bud.lower, bud.upper);
      }
    }
    reinterpret_cast<P*>(out)[p] = po;
  }
  // Tail (n % VEC elements), done by the first threads of the grid.
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = npack * VEC + t;
  if (t < VEC && i < n) {
    const int64_t b = i / D;
    if (!PER_SAMPLE || bud.on(b)) {
      const A xv = Store<S>::load(x[i]);
      const A v = linf_value(Store<S>::load(out[i]), xv, Store<S>::load(g[i]), PER_SAMPLE ? bud.e(b) : bud.eps,
                             PER_SAMPLE ? bud.a(b) : bud.alpha, bud.lower, bud.upper);
      out[i] = Store<S>::store(v, xv, bud.lower, bud.upper);
    }
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 108;
  return sms;
}

constexpr int kThreads = 256;

template <typename S>
cudaError_t launch_linf(const StepParams& p, cudaStream_t stream) {
  using A = typename Store<S>::A;
  const int64_t n = p.batch * p.per_sample;
  if (n == 0) return cudaSuccess;
  const Budget<A> bud = budget_of<A>(p);
  const bool per_sample = p.eps_ps || p.alpha_ps || p.active;
  constexpr int V = 16 / sizeof(S);
  const bool vec = aligned16(p.out) && aligned16(p.x) && aligned16(p.grad) && p.per_sample >= V;
  const int64_t packs = vec ? n / V : n;
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 16;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((packs + kThreads - 1) / kThreads, max_blocks)));
  S* out = static_cast<S*>(p.out);
  const S* x = static_cast<const S*>(p.x);
  const S* g = static_cast<const S*>(p.grad);
  if (vec && per_sample) linf_kernel<S, V, true><<<blocks, kThreads, 0, stream>>>(out, x, g, n, p.per_sample, bud);
  else if (vec) linf_kernel<S, V, false><<<blocks, kThreads, 0, stream>>>(out, x, g, n, p.per_sample, bud);
  else if (per_sample) linf_kernel<S, 1, true><<<blocks, kThreads, 0, stream>>>(out, x, g, n, p.per_sample, bud);
  else linf_kernel<S, 1, false><<<blocks, kThreads, 0, stream>>>(out, x, g, n, p.per_sample, bud);
  return cudaGetLastError();
}

// -------------------------------------------------------------- reductions
template <typename A>
__device__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// Sum of squares of f(k) over [begin, end) of one sample, accumulated in double:
// accurate, and in practice independent of the element order (so of the layout).
template <typename F>
__device__ __forceinline__ double sample_sumsq(int64_t begin, int64_t end, F f) {
  double acc = 0.0;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const double v = static_cast<double>(f(k));
    acc = __fma_rn(v, v, acc);
  }
  return acc;
}

// ------------------------------------------------------------------- l2 step
// phase 0: sum g^2;  phase 1: sum delta^2;  phase 2: write.  A fused launch runs
// all phases with one block per sample; the split path runs one phase per launch
// over (chunk, sample) blocks with partial sums in scratch (deterministic order).
template <typename S>
struct L2Args {
  using A = typename Store<S>::A;
  S* out;
  const S* x;
  const S* g;
  int64_t D;
  int64_t chunk;      // elements per block in the split path (D when fused)
  int chunks;         // blocks per sample
  Budget<A> bud;
  double* part_g;     // [B, chunks] partial sums of g^2 (split path)
  double* part_d;     // [B, chunks] partial sums of delta^2 (split path)
};

template <typename S>
__device__ __forceinline__ void l2_phase_body(const L2Args<S>& args, int phase, int64_t b, int64_t begin, int64_t end,
                                              typename Store<S>::A gnc, typename Store<S>::A factor,
                                              double* red, double* result) {
  using A = typename Store<S>::A;
  const int64_t base = b * args.D;
  const S* x = args.x + base;
  const S* g = args.g + base;
  S* out = args.out + base;
  const A a = args.bud.a(b);
  if (phase == 0) {
    *result = block_sum(sample_sumsq(begin, end, [&](int64_t k) { return Store<S>::load(g[k]); }), red);
  } else if (phase == 1) {
    *result = block_sum(sample_sumsq(begin, end, [&](int64_t k) {
      return sub(add(Store<S>::load(out[k]), mul(a, div(Store<S>::load(g[k]), gnc))), Store<S>::load(x[k]));
    }), red);
  } else {
    const A lo = args.bud.lower, hi = args.bud.upper;
    for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
      const A xv = Store<S>::load(x[k]);
      const A d = sub(add(Store<S>::load(out[k]), mul(a, div(Store<S>::load(g[k]), gnc))), xv);
      const A v = clamp_nan(add_toward(xv, mul(d, factor)), lo, hi);
      out[k] = Store<S>::store(v, xv, lo, hi);
    }
  }
}

template <typename A>
__device__ __forceinline__ A l2_factor(double dn2, A e) {
  const A dn = static_cast<A>(__dsqrt_rn(dn2));
  return dn > e ? div(e, dn) : A(1);
}

template <typename A>
__device__ __forceinline__ A clamp_norm(double n2) {
  const A n = static_cast<A>(__dsqrt_rn(n2));
  return n < A(1e-12) ? A(1e-12) : n;
}

template <typename S>
__global__ void l2_fused_kernel(L2Args<S> args) {
  using A = typename Store<S>::A;
  __shared__ double red[32];
  double gn2, dn2, res;
  const int64_t b = blockIdx.x;
  if (!args.bud.on(b)) return;
  const int64_t D = args.D;
  l2_phase_body<S>(args, 0, b, 0, D, A(0), A(0), red, &gn2);
  const A gnc = clamp_norm<A>(gn2);
  l2_phase_body<S>(args, 1, b, 0, D, gnc, A(0), red, &dn2);
  const A factor = l2_factor(dn2, args.bud.e(b));
  l2_phase_body<S>(args, 2, b, 0, D, gnc, factor, red, &res);
}

template <typename S>
__global__ void l2_split_kernel(L2Args<S> args, int phase) {
  using A = typename Store<S>::A;
  __shared__ double red[32];
  const int64_t b = blockIdx.y;
  if (!args.bud.on(b)) return;
  const int c = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(c) * args.chunk;
  const int64_t end = begin + args.chunk < args.D ? begin + args.chunk : args.D;
  A gnc = A(0), factor = A(0);
  if (phase >= 1) {
    double s = 0.0;
    for (int j = 0; j < args.chunks; ++j) s += args.part_g[b * args.chunks + j];
    gnc = clamp_norm<A>(s);
  }
  if (phase == 2) {
    double s = 0.0;
    for (int j = 0; j < args.chunks; ++j) s += args.part_d[b * args.chunks + j];
    factor = l2_factor(s, args.bud.e(b));
  }
  double result;
  l2_phase_body<S>(args, phase, b, begin, end, gnc, factor, red, &result);
  if (phase < 2 && threadIdx.x == 0) (phase == 0 ? args.part_g : args.part_d)[b * args.chunks + c] = result;
}

constexpr int kL2Threads = 512;
constexpr int64_t kMinChunk = 16384;

// Blocks per sample: 1 (fused) unless the batch is too small to fill the GPU.
int l2_chunks(int64_t B, int64_t D) {
  const int64_t want_blocks = static_cast<int64_t>(sm_count()) * 4;
  if (B >= want_blocks || D <= 2 * kMinChunk || B > 65535) return 1;
  int64_t c = std::min<int64_t>((want_blocks + B - 1) / B, (D + kMinChunk - 1) / kMinChunk);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(c, 1024)));
}

template <typename S>
cudaError_t launch_l2(const StepParams& p, void* scratch, cudaStream_t stream) {
  using A = typename Store<S>::A;
  if (p.batch == 0 || p.per_sample == 0) return cudaSuccess;
  L2Args<S> args;
  args.out = static_cast<S*>(p.out);
  args.x = static_cast<const S*>(p.x);
  args.g = static_cast<const S*>(p.grad);
  args.D = p.per_sample;
  args.bud = budget_of<A>(p);
  args.chunks = l2_chunks(p.batch, p.per_sample);
  args.chunk = (p.per_sample + args.chunks - 1) / args.chunks;
  if (args.chunks == 1) {
    args.part_g = args.part_d = nullptr;
    l2_fused_kernel<S><<<static_cast<unsigned>(p.batch), kL2Threads, 0, stream>>>(args);
    return cudaGetLastError();
  }
  args.part_g = static_cast<double*>(scratch);
  args.part_d = args.part_g + p.batch * args.chunks;
  const dim3 grid(static_cast<unsigned>(args.chunks), static_cast<unsigned>(p.batch));
  for (int phase = 0; phase < 3; ++phase) {
    l2_split_kernel<S><<<grid, kL2Threads, 0, stream>>>(args, phase);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// -------------------------------------------------------------- random start
template <typename A>
struct InitBudget {
  A eps;
  const A* eps_ps;
  A lower, upper;
  __device__ __forceinline__ A e(int64_t b) const { return eps_ps ? eps_ps[b] : eps; }
};

template <typename A>
InitBudget<A> init_budget_of(const InitParams& p) {
  return InitBudget<A>{round_down_to<A>(p.eps), static_cast<const A*>(p.eps_ps), round_up_to<A>(p.lower),
                       round_down_to<A>(p.upper)};
}

template <typename S>
__global__ void init_linf_kernel(S* __restrict__ out, const S* __restrict__ x, const float* __restrict__ u, int64_t n,
                                 int64_t D, InitBudget<typename Store<S>::A> bud) {
  using A = typename Store<S>::A;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A xv = Store<S>::load(x[i]);
    const A noise = mul(sub(mul(A(2), static_cast<A>(u[i])), A(1)), bud.e(i / D));
    const A v = clamp_nan(add_toward(xv, noise), bud.lower, bud.upper);
    out[i] = Store<S>::store(v, xv, bud.lower, bud.upper);
  }
}

template <typename S>
__global__ void init_l2_kernel(S* __restrict__ out, const S* __restrict__ x, const float* __restrict__ u,
                               const float* __restrict__ r, int64_t D, InitBudget<typename Store<S>::A> bud) {
  using A = typename Store<S>::A;
  __shared__ double red[32];
  const int64_t b = blockIdx.x;
  const int64_t base = b * D;
  const A nc = clamp_norm<A>(block_sum(sample_sumsq(0, D, [&](int64_t k) { return u[base + k]; }), red));
  const A radius = mul(static_cast<A>(pow(static_cast<A>(r[b]), A(1) / static_cast<A>(D))), bud.e(b));
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    const A xv = Store<S>::load(x[base + k]);
    const A d = mul(div(static_cast<A>(u[base + k]), nc), radius);
    const A v = clamp_nan(add_toward(xv, d), bud.lower, bud.upper);
    out[base + k] = Store<S>::store(v, xv, bud.lower, bud.upper);
  }
}

template <typename S>
cudaError_t launch_init_linf(const InitParams& p, cudaStream_t stream) {
  using A = typename Store<S>::A;
  const int64_t n = p.batch * p.per_sample;
  if (n == 0) return cudaSuccess;
  const int blocks = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((n + kThreads - 1) / kThreads, static_cast<int64_t>(sm_count()) * 16)));
  init_linf_kernel<S><<<blocks, kThreads, 0, stream>>>(static_cast<S*>(p.out), static_cast<const S*>(p.x), p.noise, n,
                                                        p.per_sample, init_budget_of<A>(p));
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_init_l2(const InitParams& p, cudaStream_t stream) {
  using A = typename Store<S>::A;
  if (p.batch == 0 || p.per_sample == 0) return cudaSuccess;
  init_l2_kernel<S><<<static_cast<unsigned>(p.batch), kL2Threads, 0, stream>>>(
      static_cast<S*>(p.out), static_cast<const S*>(p.x), p.noise, p.radius_u, p.per_sample, init_budget_of<A>(p));
  return cudaGetLastError();
}

template <template <typename> class F, typename... Args>
cudaError_t dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat: return F<float>::run(args...);
    case DType::kDouble: return F<double>::run(args...);
    case DType::kHalf: return F<__half>::run(args...);
    case DType::kBFloat16: return F<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename S> struct RunLinf { static cudaError_t run(const StepParams& p, cudaStream_t s) { return launch_linf<S>(p, s); } };
template <typename S> struct RunL2 {
  static cudaError_t run(const StepParams& p, void* scratch, cudaStream_t s) { return launch_l2<S>(p, scratch, s); }
};
template <typename S> struct RunInitLinf {
  static cudaError_t run(const InitParams& p, cudaStream_t s) { return launch_init_linf<S>(p, s); }
};
template <typename S> struct RunInitL2 {
  static cudaError_t run(const InitParams& p, cudaStream_t s) { return launch_init_l2<S>(p, s); }
};

}  // namespace

size_t l2_scratch_bytes(DType dtype, int64_t batch, int64_t per_sample) {
  const int chunks = l2_chunks(batch, per_sample);
  if (chunks == 1) return 0;
  (void)dtype;
  return 2 * static_cast<size_t>(batch) * static_cast<size_t>(chunks) * sizeof(double);
}

cudaError_t pgd_step_linf(DType dtype, const StepParams& p, cudaStream_t stream) {
  return dispatch<RunLinf>(dtype, p, stream);
}
cudaError_t pgd_step_l2(DType dtype, const StepParams& p, void* scratch, cudaStream_t stream) {
  return dispatch<RunL2>(dtype, p, scratch, stream);
}
cudaError_t ball_init_linf(DType dtype, const InitParams& p, cudaStream_t stream) {
  return dispatch<RunInitLinf>(dtype, p, stream);
}
cudaError_t ball_init_l2(DType dtype, const InitParams& p, cudaStream_t stream) {
  return dispatch<RunInitL2>(dtype, p, stream);
}

}  // namespace cuda
}  // namespace drp
