// Element math of the batched PGD step, shared by the CPU (.cpp) and CUDA (.cu)
// sources. No torch headers: this file must compile with plain nvcc.
//
// Exactness rule (documented in drp_kernels/ops/pgd_step.py and mirrored by
// drp_kernels/reference.py):
//  * x + d is computed "toward x": the float nearest to x + d, except that when
//    rounding carried it past the real x + d (away from x) it is moved one ulp
//    back toward x. So |result - x| <= |d| holds exactly, in real arithmetic.
//    Knuth's TwoSum gives the exact rounding error, so the test is exact.
//  * fp16/bf16 outputs are rounded the same way: to nearest, then one ulp back
//    toward x if rounding moved the value away from x past the fp32 result.
//  * after that a value outside [lower, upper] is moved one ulp inside (only
//    possible when x itself lies outside [lower, upper]).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DRP_HD __host__ __device__ __forceinline__
#else
#define DRP_HD inline
#endif

namespace drp {

template <typename T> struct BitsOf;
template <> struct BitsOf<float> { using type = uint32_t; };
template <> struct BitsOf<double> { using type = uint64_t; };

template <typename T>
DRP_HD typename BitsOf<T>::type to_bits(T v) {
  typename BitsOf<T>::type b;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) b = __float_as_uint(v); else b = (uint64_t)__double_as_longlong(v);
#else
  std::memcpy(&b, &v, sizeof(T));
#endif
  return b;
}

template <typename T>
DRP_HD T from_bits(typename BitsOf<T>::type b) {
  T v;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) v = __uint_as_float(b); else v = __longlong_as_double((long long)b);
#else
  std::memcpy(&v, &b, sizeof(T));
#endif
  return v;
}

// One ulp step on the raw bits of an IEEE value (any width): towards -inf / +inf.
template <typename U>
DRP_HD U bits_step_down(U b) {
  const U sign = U(1) << (sizeof(U) * 8 - 1);
  if (b == U(0)) return U(sign | U(1));  // +0 -> -denorm_min
  return (b & sign) ? U(b + 1) : U(b - 1);
}

template <typename U>
DRP_HD U bits_step_up(U b) {
  const U sign = U(1) << (sizeof(U) * 8 - 1);
  if (b == sign) return U(1);  // -0 -> +denorm_min
  return (b & sign) ? U(b - 1) : U(b + 1);
}

// x + d rounded to nearest, then moved one ulp back toward x if it overshot the
// real sum. Requires round-to-nearest arithmetic without reassociation (no
// -ffast-math on the host; on the device __fadd_rn keeps nvcc from contracting).
template <typename T>
DRP_HD T add_toward(T x, T d) {
#if defined(__CUDA_ARCH__)
  T s, bp, ap, err;
  if constexpr (sizeof(T) == 4) {
    s = __fadd_rn(x, d);
    bp = __fsub_rn(s, x);
    ap = __fsub_rn(s, bp);
    err = __fadd_rn(__fsub_rn(x, ap), __fsub_rn(d, bp));
  } else {
    s = __dadd_rn(x, d);
    bp = __dsub_rn(s, x);
    ap = __dsub_rn(s, bp);
    err = __dadd_rn(__dsub_rn(x, ap), __dsub_rn(d, bp));
  }
#else
  const T s = x + d;
  const T bp = s - x;
  const T ap = s - bp;
  const T err = (x - ap) + (d - bp);
#endif
  // err = (x + d) - s exactly. Overshoot: s beyond the real sum, away from x.
  const auto b = to_bits(s);
  if (d > T(0) && err < T(0)) return from_bits<T>(bits_step_down(b));
  if (d < T(0) && err > T(0)) return from_bits<T>(bits_step_up(b));
  return s;
}

// Clamp that keeps NaN (a comparison with NaN is false), like torch.clamp.
template <typename T>
DRP_HD T clamp_nan(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// sign(g) with sign(0) = 0 and, like torch.sign, sign(NaN) = 0.
template <typename T>
DRP_HD T sign_of(T g) {
  return T(g > T(0)) - T(g < T(0));
}

// Round an fp32 result v to a 16-bit float (bits in, bits out) toward x, then
// into [lo, hi]. Cvt provides to_float(uint16_t) and from_float(float) (RNE).
template <typename Cvt>
DRP_HD uint16_t round16_toward(float v, float x, float lo, float hi) {
  uint16_t r = Cvt::from_float(v);
  float rf = Cvt::to_float(r);
  if (v > x && rf > v) {
    r = bits_step_down(r);
    rf = Cvt::to_float(r);
  } else if (v < x && rf < v) {
    r = bits_step_up(r);
    rf = Cvt::to_float(r);
  }
  if (rf > hi) r = bits_step_down(r);
  else if (rf < lo) r = bits_step_up(r);
  return r;
}

// Scalars of the op: eps is rounded down, lower up and upper down to the compute
// type, so the guarantees hold against the caller's (double) values too.
template <typename T>
DRP_HD T round_down_to(double v) {
  T t = static_cast<T>(v);
  if (static_cast<double>(t) > v) t = from_bits<T>(bits_step_down(to_bits(t)));
  return t;
}

template <typename T>
DRP_HD T round_up_to(double v) {
  T t = static_cast<T>(v);
  if (static_cast<double>(t) < v) t = from_bits<T>(bits_step_up(to_bits(t)));
  return t;
}

// Step budget of a batch: scalar eps / alpha, or per-sample values when the pointers are set;
// samples whose ``active`` flag is false are left untouched. [lower, upper] is the valid range,
// already rounded inward to the compute type A.
template <typename A>
struct Budget {
  A eps, alpha;
  const A* eps_ps;
  const A* alpha_ps;
  const bool* active;
  A lower, upper;
  DRP_HD A e(int64_t b) const { return eps_ps ? eps_ps[b] : eps; }
  DRP_HD A a(int64_t b) const { return alpha_ps ? alpha_ps[b] : alpha; }
  DRP_HD bool on(int64_t b) const { return active ? active[b] : true; }
};

}  // namespace drp
