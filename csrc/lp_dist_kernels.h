// Micro-kernels of drp::lp_dist_cpu_* for one instruction set.
//
// No include guard on purpose: lp_dist.cpp includes this file once per instruction set, each
// time inside a different `#pragma GCC target` region and with these macros set:
//   LPD_NS    namespace of this copy           LPD_VB   bytes per SIMD vector (16, 32, 64)
//   LPD_ISA   512 (AVX-512), 256 (AVX2 + FMA), 128 (x86 SSE2) or 0 (portable vector extensions)
//   LPD_RB    rows of x per forward tile        LPD_NV   vectors of w columns per forward tile
//   LPD_RBI   rows of x per p = inf tile with the arg-max index (it needs twice the registers)
//   LPD_RBS   rows of x per power-sum tile
//   LPD_BRB   rows of x per backward step       LPD_BRN  rows of w per backward step
// The arithmetic is written with GCC vector extensions, and every operation that has one x86
// instruction (splat, max, compare, blend, movemask) goes through the small shims below, so
// each copy compiles to plain register code: no per-lane inserts, no compare-and-blend maxima,
// accumulators in registers (objdump -d shows it; bench/RESULTS.md counts the instructions).
//
// Layouts (all padded by the caller, so there is no tail handling here):
//   forward:  x (Bp, D) row-major; wT one panel of w transposed, (D, ldw), whose first NV * lanes
//             columns are the tile's; a tile is R rows of x times those columns, accumulated over k
//             as an outer product (each loaded w vector is reused by R rows).
//   backward: x (Dp / L, Bp, L) and w (Dp / L, Np, L), k-block major: for one block of L
//             coordinates the rows follow each other contiguously; grad_x and grad_w likewise. The
//             coefficient c[b, n] and the inverse scale inv[b, n] are given transposed, (Np, Bp).
//
// Power modes (template parameter E): E >= 1 a compile-time integer exponent, kPowInt a run-time
// integer exponent (square-and-multiply over the whole register tile, binary or by windows of two
// bits, whichever takes fewer multiplies: one well-predicted branch per step per tile, not per
// vector), kPowReal a non-integer exponent (exp2(q log2 t)).
// Denormals: the caller runs every worker with FTZ/DAZ set (lp_dist.cpp, FlushDenormals), so a
// power that leaves the normal range costs nothing and gives 0.

namespace LPD_NS {

template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(LPD_VB)));
  typedef int32_t I __attribute__((vector_size(LPD_VB)));
  typedef int32_t IS;
  static constexpr int L = LPD_VB / 4;
  static constexpr IS kAbs = 0x7fffffff;
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(LPD_VB)));
  typedef int64_t I __attribute__((vector_size(LPD_VB)));
  typedef int64_t IS;
  static constexpr int L = LPD_VB / 8;
  static constexpr IS kAbs = 0x7fffffffffffffffLL;
};

constexpr int RB = LPD_RB;
constexpr int RBI = LPD_RBI;
constexpr int RBS = LPD_RBS;
constexpr int NV = LPD_NV;
constexpr int BRB = LPD_BRB;
constexpr int BRN = LPD_BRN;

#define LPD_AI static inline __attribute__((always_inline))
#define LPD_V typename Vec<T>::V
#define LPD_I typename Vec<T>::I

// ------------------------------------------------------------------- one-instruction shims
template <typename T> LPD_AI LPD_V vload(const T* p) {
  LPD_V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> LPD_AI void vstore(T* p, LPD_V v) { __builtin_memcpy(p, &v, sizeof(v)); }

template <typename T> LPD_AI LPD_V splat(T s) {
#if LPD_ISA == 512
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm512_set1_ps(s); else return (LPD_V)_mm512_set1_pd(s);
#elif LPD_ISA == 256
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm256_set1_ps(s); else return (LPD_V)_mm256_set1_pd(s);
#elif LPD_ISA == 128
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm_set1_ps(s); else return (LPD_V)_mm_set1_pd(s);
#else
  LPD_V v;
  for (int i = 0; i < Vec<T>::L; ++i) v[i] = s;
  return v;
#endif
}
template <typename T> LPD_AI LPD_I splat_i(typename Vec<T>::IS s) {
  LPD_I v = {};
  return v + s;  // integer: no signed-zero issue, folds to a broadcast
}

// max(a, b); NaN in a gives b (the x86 rule); callers never rely on NaN here.
template <typename T> LPD_AI LPD_V vmax(LPD_V a, LPD_V b) {
#if LPD_ISA == 512
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm512_max_ps(a, b); else return (LPD_V)_mm512_max_pd(a, b);
#elif LPD_ISA == 256
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm256_max_ps(a, b); else return (LPD_V)_mm256_max_pd(a, b);
#elif LPD_ISA == 128
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm_max_ps(a, b); else return (LPD_V)_mm_max_pd(a, b);
#else
  return a > b ? a : b;
#endif
}
template <typename T> LPD_AI LPD_V vabs(LPD_V d) { return (LPD_V)((LPD_I)d & Vec<T>::kAbs); }
template <typename T> LPD_AI LPD_V vsignbit(LPD_V d) { return (LPD_V)((LPD_I)d & ~Vec<T>::kAbs); }
template <typename T> LPD_AI LPD_V vor(LPD_V a, LPD_V b) { return (LPD_V)((LPD_I)a | (LPD_I)b); }

// Comparison masks: a k-register on AVX-512, all-ones lanes elsewhere.
#if LPD_ISA == 512
template <typename T> struct MaskOf { typedef __mmask16 M; };
template <> struct MaskOf<double> { typedef __mmask8 M; };
#else
template <typename T> struct MaskOf { typedef typename Vec<T>::V M; };
#endif
#define LPD_M typename MaskOf<T>::M

template <typename T> LPD_AI LPD_M vgt(LPD_V a, LPD_V b) {  // a > b, false for NaN
#if LPD_ISA == 512
  if constexpr (sizeof(T) == 4) return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); else return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ);
#elif LPD_ISA == 256
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm256_cmp_ps(a, b, _CMP_GT_OQ); else return (LPD_V)_mm256_cmp_pd(a, b, _CMP_GT_OQ);
#elif LPD_ISA == 128
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm_cmpgt_ps(a, b); else return (LPD_V)_mm_cmpgt_pd(a, b);
#else
  return (LPD_V)(a > b);
#endif
}
// a where m, else b
template <typename T> LPD_AI LPD_V vsel(LPD_M m, LPD_V a, LPD_V b) {
#if LPD_ISA == 512
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm512_mask_blend_ps(m, b, a); else return (LPD_V)_mm512_mask_blend_pd(m, b, a);
#elif LPD_ISA == 256
  if constexpr (sizeof(T) == 4) return (LPD_V)_mm256_blendv_ps(b, a, m); else return (LPD_V)_mm256_blendv_pd(b, a, m);
#else
  return (LPD_V)(((LPD_I)m & (LPD_I)a) | (~(LPD_I)m & (LPD_I)b));
#endif
}

// a | b
template <typename T> LPD_AI LPD_M mor(LPD_M a, LPD_M b) {
#if LPD_ISA == 512
  return a | b;
#else
  return (LPD_V)((LPD_I)a | (LPD_I)b);
#endif
}

// any lane set
template <typename T> LPD_AI bool many(LPD_M m) {
#if LPD_ISA == 512
  return m != 0;
#elif LPD_ISA == 256
  if constexpr (sizeof(T) == 4) return _mm256_movemask_ps((__m256)m) != 0; else return _mm256_movemask_pd((__m256d)m) != 0;
#elif LPD_ISA == 128
  if constexpr (sizeof(T) == 4) return _mm_movemask_ps((__m128)m) != 0; else return _mm_movemask_pd((__m128d)m) != 0;
#else
  const LPD_I mi = (LPD_I)m;
  bool any = false;
  for (int i = 0; i < Vec<T>::L; ++i) any |= mi[i] != 0;
  return any;
#endif
}

// the lanes of a mask as bits (lane i -> bit i)
template <typename T> LPD_AI unsigned lane_bits(LPD_M m) {
#if LPD_ISA == 512
  return static_cast<unsigned>(m);
#elif LPD_ISA == 256
  if constexpr (sizeof(T) == 4) return _mm256_movemask_ps((__m256)m); else return _mm256_movemask_pd((__m256d)m);
#elif LPD_ISA == 128
  if constexpr (sizeof(T) == 4) return _mm_movemask_ps((__m128)m); else return _mm_movemask_pd((__m128d)m);
#else
  const LPD_I mi = (LPD_I)m;
  unsigned bits = 0;
  for (int i = 0; i < Vec<T>::L; ++i) bits |= static_cast<unsigned>(mi[i] != 0) << i;
  return bits;
#endif
}

// ------------------------------------------------------------------------------ powers
// t[i] = t[i]^e for the NT vectors of a tile, e >= 1, by square-and-multiply. With a compile-time
// e (always_inline, constant propagation) the loops unroll into a fixed chain; with a run-time e
// each exponent bit costs one branch for the whole tile, predicted after the first k.
template <typename T, int NT>
LPD_AI void tile_ipow_binary(LPD_V (&t)[NT], unsigned e) {
  while (!(e & 1u)) {
    for (int i = 0; i < NT; ++i) t[i] = t[i] * t[i];
    e >>= 1;
  }
  LPD_V r[NT];
  for (int i = 0; i < NT; ++i) r[i] = t[i];
  e >>= 1;
  while (e) {
    for (int i = 0; i < NT; ++i) t[i] = t[i] * t[i];
    if (e & 1u)
      for (int i = 0; i < NT; ++i) r[i] = r[i] * t[i];
    e >>= 1;
  }
  for (int i = 0; i < NT; ++i) t[i] = r[i];
}

// The multiplies of t^e (e >= 1) by the binary chain above, and by the left-to-right chain with
// windows of two bits (tile_ipow_window: t^3 made once, every later pair of one bits "11" costs
// two squarings and one multiply by t^3 instead of two squarings and two multiplies). The window
// saves multiplies for exponents with runs of one bits: p - 1 = 63 takes 8 instead of 10.
constexpr int ipow_binary_cost(unsigned e) {
  int bits = 0, ones = 0;
  for (unsigned v = e; v; v >>= 1) {
    ++bits;
    ones += static_cast<int>(v & 1u);
  }
  return bits - 1 + ones - 1;
}
constexpr int ipow_window_cost(unsigned e) {
  int i = 31 - __builtin_clz(e);
  int cost = 2;  // t^2, t^3
  i -= (i >= 1 && ((e >> (i - 1)) & 1u)) ? 2 : 1;
  while (i >= 0) {
    if (!((e >> i) & 1u)) {
      cost += 1;
      i -= 1;
    } else if (i >= 1 && ((e >> (i - 1)) & 1u)) {
      cost += 3;
      i -= 2;
    } else {
      cost += 2;
      i -= 1;
    }
  }
  return cost;
}
constexpr bool ipow_use_window(unsigned e) { return e >= 3 && ipow_window_cost(e) < ipow_binary_cost(e); }

// t^e by windows of two bits, from the top: r starts at t^3 ("11") or t ("1"); then a zero bit
// squares r, a pair "11" raises r to the 4th and multiplies by t^3, a lone one squares and
// multiplies by t. One branch per step for the whole tile, as in tile_ipow_binary.
template <typename T, int NT>
LPD_AI void tile_ipow_window(LPD_V (&t)[NT], unsigned e) {
  LPD_V t3[NT];
  LPD_V r[NT];
  for (int i = 0; i < NT; ++i) t3[i] = t[i] * t[i] * t[i];
  int i = 31 - __builtin_clz(e);
  if (i >= 1 && ((e >> (i - 1)) & 1u)) {
    for (int j = 0; j < NT; ++j) r[j] = t3[j];
    i -= 2;
  } else {
    for (int j = 0; j < NT; ++j) r[j] = t[j];
    i -= 1;
  }
  while (i >= 0) {
    if (!((e >> i) & 1u)) {
      for (int j = 0; j < NT; ++j) r[j] = r[j] * r[j];
      i -= 1;
    } else if (i >= 1 && ((e >> (i - 1)) & 1u)) {
      for (int j = 0; j < NT; ++j) {
        const LPD_V r2 = r[j] * r[j];
        r[j] = (r2 * r2) * t3[j];
      }
      i -= 2;
    } else {
      for (int j = 0; j < NT; ++j) r[j] = (r[j] * r[j]) * t[j];
      i -= 1;
    }
  }
  for (int j = 0; j < NT; ++j) t[j] = r[j];
}

// A run-time exponent as the kernels pass it to tile_pow: e, with kIpowWindow set where the window
// chain takes fewer multiplies (decided once per kernel call by ipow_arg, not per tile).
constexpr unsigned kIpowWindow = 1u << 31;
constexpr unsigned ipow_arg(unsigned e) { return ipow_use_window(e) ? (e | kIpowWindow) : e; }
template <typename T, int NT>
LPD_AI void tile_ipow(LPD_V (&t)[NT], unsigned ea) {
  if (ea & kIpowWindow)
    tile_ipow_window<T, NT>(t, ea & ~kIpowWindow);
  else
    tile_ipow_binary<T, NT>(t, ea);
}

// t^q = exp2(q * log2(t)) for float vectors, 0 <= t <= 1, q > 0 (0^q = 0). log(m) on
// [sqrt(1/2), sqrt(2)) and 2^f on [-1/2, 1/2] are the minimax polynomials of Cephes' logf and
// exp2f (relative error ~1e-7 each); results below 2^-126 are 0.
LPD_AI Vec<float>::V vpow_real_f32(Vec<float>::V t, float q) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  const I bits = (I)t;
  I ex = ((bits >> 23) & 0xff) - 127;
  V m = (V)((bits & 0x007fffff) | 0x3f800000);  // mantissa in [1, 2)
  const I big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  ex = ex - big;  // big is -1 where true
  const V x = m - 1.0f;
  const V z = x * x;
  V y = x * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z - 0.5f * z;
  const V log2t = (x + y) * 1.44269504088896341f + __builtin_convertvector(ex, V);
  const V yv = log2t * q;  // <= 0 up to rounding
  const V half = yv < 0.0f ? V{} - 0.5f : V{} + 0.5f;
  const I n = __builtin_convertvector(yv + half, I);  // round to nearest
  const V f = yv - __builtin_convertvector(n, V);  // in [-1/2, 1/2]
  V px = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
  px = px * f + 9.618437357674640e-3f;
  px = px * f + 5.550332471162809e-2f;
  px = px * f + 2.402264791363012e-1f;
  px = px * f + 6.931472028550421e-1f;
  const V r = px * f + 1.0f;
  const I nn = n < -126 ? I{} - 126 : n;
  const V res = r * (V)((nn + 127) << 23);
  return (t > 0.0f) & (yv >= -126.0f) ? res : V{};
}

// t^q lane by lane for a non-integer q (t >= 0; 0^q = 0 for q > 0): the vector exp2/log2 above
// for float, std::pow for double (the slow path).
template <typename T>
static inline LPD_V vpow_real(LPD_V t, T q) {
  if constexpr (sizeof(T) == 4) {
    return vpow_real_f32(t, q);
  } else {
    T lanes[Vec<T>::L];
    __builtin_memcpy(lanes, &t, sizeof(t));
    for (int i = 0; i < Vec<T>::L; ++i) lanes[i] = lanes[i] > T(0) ? std::pow(lanes[i], q) : T(0);
    LPD_V r;
    __builtin_memcpy(&r, lanes, sizeof(r));
    return r;
  }
}

// The tile's powers by mode: E >= 1 fixed, kPowInt run-time integer e (as ipow_arg gives it),
// kPowReal exponent q.
template <typename T, int E, int NT>
LPD_AI void tile_pow(LPD_V (&t)[NT], unsigned e, T q) {
  if constexpr (E == kPowReal) {
    for (int i = 0; i < NT; ++i) t[i] = vpow_real<T>(t[i], q);
  } else if constexpr (E == kPowInt) {
    tile_ipow<T, NT>(t, e);
  } else if constexpr (E > 1) {
    if constexpr (ipow_use_window(static_cast<unsigned>(E)))
      tile_ipow_window<T, NT>(t, static_cast<unsigned>(E));
    else
      tile_ipow_binary<T, NT>(t, static_cast<unsigned>(E));
  }
}

// ------------------------------------------------------------------------------ forward
// m[r, c] = max_k |x[r, k] - wT[k, c]| for an R x (NV * L) tile; with IDX also the first arg-max
// k (strict >, so ties keep the earliest k). NaN is ignored here; the caller patches pairs whose
// rows hold a NaN.
template <typename T, int R, bool IDX>
__attribute__((noinline)) static void fwd_max(const T* __restrict__ x, int64_t ldx, const T* __restrict__ wT, int64_t ldw, int64_t D,
                    T* __restrict__ m_out, int64_t* __restrict__ idx_out) {
  using V = LPD_V;
  using I = LPD_I;
  using IS = typename Vec<T>::IS;
  constexpr int L = Vec<T>::L;
  V acc[R][NV];
  V id[R][NV];  // index bits, kept in float registers so the select is one blend
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = V{};
      id[r][v] = V{};
    }
  for (int64_t k = 0; k < D; ++k) {
    const T* wk = wT + k * ldw;
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload<T>(wk + v * L);
    const V kv = (V)splat_i<T>(static_cast<IS>(k));
    for (int r = 0; r < R; ++r) {
      const V xb = splat<T>(x[r * ldx + k]);
      for (int v = 0; v < NV; ++v) {
        const V a = vabs<T>(xb - w[v]);
        if constexpr (IDX) {
          const auto gt = vgt<T>(a, acc[r][v]);
          acc[r][v] = vmax<T>(a, acc[r][v]);
          id[r][v] = vsel<T>(gt, kv, id[r][v]);
        } else {
          acc[r][v] = vmax<T>(a, acc[r][v]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      vstore<T>(m_out + r * NV * L + v * L, acc[r][v]);
      if constexpr (IDX) {
        IS tmp[L];
        const I ib = (I)id[r][v];
        __builtin_memcpy(tmp, &ib, sizeof(tmp));
        for (int i = 0; i < L; ++i) idx_out[r * NV * L + v * L + i] = tmp[i];
      }
    }
}

// s[r, c] = sum_k t^p over an R x (NV * L) tile, t = d * inv[r, c] (SCALED) or t = d (the inputs
// are already scaled), d = x[r, k] - wT[k, c]; |d| unless the exponent is an even integer (ABS
// false). E == 1 with ABS: the plain sum of |d| (p = 1).
template <typename T, int R, int E, bool SCALED, bool ABS>
__attribute__((noinline)) static void fwd_pow_sum(const T* __restrict__ x, int64_t ldx, const T* __restrict__ wT, int64_t ldw, int64_t D,
                        const T* __restrict__ inv, T* __restrict__ s_out, unsigned e, T q) {
  using V = LPD_V;
  constexpr int L = Vec<T>::L;
  constexpr int NT = R * NV;
  if constexpr (E == kPowInt) e = ipow_arg(e);
  V acc[NT];
  V iv[NT];
  for (int i = 0; i < NT; ++i) {
    acc[i] = V{};
    iv[i] = SCALED ? vload<T>(inv + i * L) : V{};
  }
  for (int64_t k = 0; k < D; ++k) {
    const T* wk = wT + k * ldw;
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload<T>(wk + v * L);
    V t[NT];
    for (int r = 0; r < R; ++r) {
      const V xb = splat<T>(x[r * ldx + k]);
      for (int v = 0; v < NV; ++v) {
        V d = xb - w[v];
        if constexpr (ABS) d = vabs<T>(d);
        if constexpr (SCALED) d = d * iv[r * NV + v];
        t[r * NV + v] = d;
      }
    }
    tile_pow<T, E, NT>(t, e, q);
    for (int i = 0; i < NT; ++i) acc[i] += t[i];
  }
  for (int i = 0; i < NT; ++i) vstore<T>(s_out + i * L, acc[i]);
}

// ------------------------------------------------------- double vectors of the native width
typedef Vec<double>::V DN;
typedef Vec<double>::I DNI;
constexpr int DNL = Vec<double>::L;
typedef float HalfF __attribute__((vector_size(LPD_VB / 2)));  // DNL floats

// DNL lanes at p as doubles (a float load converts in one instruction).
template <typename T> LPD_AI DN load_dn(const T* p) {
  if constexpr (sizeof(T) == 4) {
    HalfF h;
    __builtin_memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, DN);
  } else {
    return vload<double>(p);
  }
}
template <typename T> LPD_AI void store_dn(T* p, DN v) {
  if constexpr (sizeof(T) == 4) {
    const HalfF h = __builtin_convertvector(v, HalfF);
    __builtin_memcpy(p, &h, sizeof(h));
  } else {
    vstore<double>(p, v);
  }
}

// any lane of a vector-extension comparison result (all-ones / zero int64 lanes) set
LPD_AI bool any_lane(DNI m) {
#if LPD_ISA == 512
  return _mm512_test_epi64_mask((__m512i)m, (__m512i)m) != 0;
#elif LPD_ISA == 256
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#elif LPD_ISA == 128
  return _mm_movemask_pd((__m128d)m) != 0;
#else
  bool any = false;
  for (int i = 0; i < DNL; ++i) any |= m[i] != 0;
  return any;
#endif
}

// ----------------------------------------------------------------- root of a tile (float)
// r = s^q for positive normal s and 0 < q <= 1, lane by lane in double (the split of log2 s into
// its exponent and mantissa parts loses no bits there); relative error ~1e-10.
LPD_AI DN dpow_pos(DN s, double q) {
  const DNI bits = (DNI)s;
  const DNI ex = ((bits >> 52) & 0x7ff) - 1023;
  DN m = (DN)((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);  // [1, 2)
  const DNI big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  const DNI e2 = ex - big;  // big is -1 where true
  const double magic = 6755399441055744.0;  // 1.5 * 2^52: int <-> double by one add
  const DN mg = DN{} + magic;
  const DN ed = (DN)(e2 + (DNI)mg) - magic;
  // ln m = 2 atanh(u), u = (m - 1) / (m + 1), |u| <= 0.1716: the series to u^13 (error < 1e-13)
  const DN u = (m - 1.0) / (m + 1.0);
  const DN u2 = u * u;
  DN poly = u2 * (1.0 / 13) + 1.0 / 11;
  poly = poly * u2 + 1.0 / 9;
  poly = poly * u2 + 1.0 / 7;
  poly = poly * u2 + 1.0 / 5;
  poly = poly * u2 + 1.0 / 3;
  poly = poly * u2 + 1.0;
  const DN log2s = ed + (2.0 * 1.4426950408889634) * u * poly;
  const DN y = log2s * q;
  const DN yr = (y + magic) - magic;  // round to nearest
  const DNI n = (DNI)(y + magic) - (DNI)mg;
  const DN g = (y - yr) * 0.6931471805599453;  // |g| <= ln(2) / 2
  DN ex2 = g * (1.0 / 362880) + 1.0 / 40320;  // e^g, Taylor to g^9 (error < 1e-11)
  ex2 = ex2 * g + 1.0 / 5040;
  ex2 = ex2 * g + 1.0 / 720;
  ex2 = ex2 * g + 1.0 / 120;
  ex2 = ex2 * g + 1.0 / 24;
  ex2 = ex2 * g + 1.0 / 6;
  ex2 = ex2 * g + 0.5;
  ex2 = ex2 * g + 1.0;
  ex2 = ex2 * g + 1.0;
  return ex2 * (DN)((n + 1023) << 52);
}

// The root step of NT lanes (NT a multiple of L) of one tile, in place:
//   in:  m (the pair's max |d|, MODE_D) or nothing (the inputs were pre-scaled), s (the sum)
//   out: out = scale * m * s^(1/p), inv = 1 / m (1 if pre-scaled), r = s^((1 - p) / p)
// Pairs that are all zero (m = 0) give out 0, inv 0, r 0 (a zero gradient); m = inf gives out inf
// and r NaN (the gradient of an infinite distance is undefined); NaN is patched by the caller.
// The sum is not clamped: r must be computed from the very sum the terms produce, or the largest
// gradient term would carry the rounding of inv amplified p - 1 times.
template <typename T, bool MODE_D>
static void finish_tile(int NT, double p, T scale, const T* m, const T* s, T* out, T* inv, T* r) {
  const double q = 1.0 / p;
  if constexpr (sizeof(T) == 4) {
    for (int i0 = 0; i0 < NT; i0 += DNL) {
      DN sd;
      for (int i = 0; i < DNL; ++i) {
        const double v = s[i0 + i];  // >= (m * inv)^p ~ 1 with MODE_D, >= 2^-60 otherwise
        sd[i] = (v > 1e-300 && v < 1e300) ? v : 1.0;  // keeps the polynomial in range (edge lanes)
      }
      const DN root = p == 2.0 ? DN{} : dpow_pos(sd, q);
      for (int i = 0; i < DNL; ++i) {
        const double mm = MODE_D ? static_cast<double>(m[i0 + i]) : 1.0;
        const double rt = p == 2.0 ? std::sqrt(sd[i]) : root[i];
        const int j = i0 + i;
        if (MODE_D && !(mm > 0.0)) {  // 0 or NaN
          out[j] = static_cast<T>(mm);
          if (inv) { inv[j] = T(0); r[j] = mm == 0.0 ? T(0) : static_cast<T>(NAN); }
        } else if (MODE_D && std::isinf(mm)) {
          out[j] = static_cast<T>(INFINITY);
          if (inv) { inv[j] = T(0); r[j] = static_cast<T>(NAN); }
        } else {
          out[j] = static_cast<T>(static_cast<double>(scale) * mm * rt);
          if (inv) { inv[j] = MODE_D ? T(1) / m[j] : T(1); r[j] = static_cast<T>(rt / sd[i]); }
        }
      }
    }
  } else {
    for (int j = 0; j < NT; ++j) {
      const double mm = MODE_D ? static_cast<double>(m[j]) : 1.0;
      double sv = s[j];
      if (!(sv > 1e-300)) sv = 1.0;  // edge lanes only (see the float branch)
      if (MODE_D && !(mm > 0.0)) {
        out[j] = mm;
        if (inv) { inv[j] = 0.0; r[j] = mm == 0.0 ? 0.0 : NAN; }
      } else if (MODE_D && std::isinf(mm)) {
        out[j] = INFINITY;
        if (inv) { inv[j] = 0.0; r[j] = NAN; }
      } else {
        const double rt = p == 2.0 ? std::sqrt(sv) : std::pow(sv, q);
        out[j] = static_cast<double>(scale) * mm * rt;
        if (inv) { inv[j] = MODE_D ? 1.0 / mm : 1.0; r[j] = rt / sv; }
      }
    }
  }
}

// ----------------------------------------------------------------------------- backward
// For rows b in [b0, b1) (multiples of BRB) and the BRN rows n0.. of w, at one block of L
// coordinates (xk, wk, gxk, gwk point at the block):
//   gx[b, k] += sum_n c[b, n] * g(d),   gw[n, k] = -sum_{b in [b0, b1)} c[b, n] * g(d)   (written)
// with d = x[b, k] - w[n, k] and g(d) = sign(d) |d * inv[b, n]|^(p - 1): E / e / q give the power
// p - 1 (E == 1: p = 2); SIGNED: p - 1 is an odd integer, so (d * inv)^(p - 1) carries the sign
// itself; otherwise the sign bit of d is put on |d * inv|^(p - 1). SIGN_ONLY: p = 1, g = sign(d).
// UNIT: inv is 1 for every pair (the pre-scaled scheme), so iT is not read.
template <typename T, int E, bool SIGN_ONLY, bool SIGNED, bool UNIT>
LPD_AI void bwd_block(const T* __restrict__ xk, const T* __restrict__ wk, const T* __restrict__ cT,
                      const T* __restrict__ iT, int64_t n0, int64_t b0, int64_t b1, int64_t Bp,
                      T* __restrict__ gxk, T* __restrict__ gwk, unsigned e, T q) {
  using V = LPD_V;
  constexpr int L = Vec<T>::L;
  constexpr int NT = BRB * BRN;
  if constexpr (E == kPowInt) e = ipow_arg(e);
  const V one = splat<T>(T(1));
  const V zero = V{};
  V wv[BRN];
  V gwa[BRN];
  for (int j = 0; j < BRN; ++j) {
    wv[j] = vload<T>(wk + (n0 + j) * L);
    gwa[j] = V{};
  }
  for (int64_t b = b0; b < b1; b += BRB) {
    V xv[BRB];
    V gxa[BRB];
    for (int r = 0; r < BRB; ++r) {
      xv[r] = vload<T>(xk + (b + r) * L);
      gxa[r] = V{};
    }
    V d[NT];
    V t[NT];
    for (int j = 0; j < BRN; ++j)
      for (int r = 0; r < BRB; ++r) {
        d[j * BRB + r] = xv[r] - wv[j];
        if constexpr (!SIGN_ONLY) {
          const V dd = SIGNED ? d[j * BRB + r] : vabs<T>(d[j * BRB + r]);
          t[j * BRB + r] = UNIT ? dd : dd * splat<T>(iT[(n0 + j) * Bp + b + r]);
        }
      }
    if constexpr (!SIGN_ONLY) tile_pow<T, E, NT>(t, e, q);
    for (int j = 0; j < BRN; ++j)
      for (int r = 0; r < BRB; ++r) {
        const int i = j * BRB + r;
        const V c = splat<T>(cT[(n0 + j) * Bp + b + r]);
        V g;
        if constexpr (SIGN_ONLY) {
          g = vsel<T>(vgt<T>(d[i], zero), one, zero) - vsel<T>(vgt<T>(zero, d[i]), one, zero);
        } else if constexpr (SIGNED) {
          g = t[i];
        } else {
          g = vor<T>(t[i], vsignbit<T>(d[i]));
        }
        const V sg = g * c;
        gxa[r] += sg;
        gwa[j] -= sg;
      }
    for (int r = 0; r < BRB; ++r) {
      T* gp = gxk + (b + r) * L;
      vstore<T>(gp, vload<T>(gp) + gxa[r]);
    }
  }
  for (int j = 0; j < BRN; ++j) vstore<T>(gwk + (n0 + j) * L, gwa[j]);
}

// The dense backward of rows [b0, b1) over every block of coordinates and every row of w.
template <typename T, int E, bool SIGN_ONLY, bool SIGNED, bool UNIT>
__attribute__((noinline)) static void bwd_rows(const T* __restrict__ x, const T* __restrict__ w,
                                               const T* __restrict__ cT, const T* __restrict__ iT, int64_t b0,
                                               int64_t b1, int64_t Bp, int64_t Np, int64_t Dp, T* __restrict__ gx,
                                               T* __restrict__ gw, unsigned e, T q) {
  constexpr int L = Vec<T>::L;
  for (int64_t kb = 0; kb < Dp / L; ++kb)
    for (int64_t n0 = 0; n0 < Np; n0 += BRN)
      bwd_block<T, E, SIGN_ONLY, SIGNED, UNIT>(x + kb * Bp * L, w + kb * Np * L, cT, iT, n0, b0, b1, Bp,
                                               gx + kb * Bp * L, gw + kb * Np * L, e, q);
}

// Float exponents up to these run as fixed, fully unrolled chains (one instantiation each): the
// forward's p (pre-scaled up to 16, two passes up to 32) and the backward's p - 1.
constexpr int kFixedFwdMax = 32;
constexpr int kFixedBwdMax = 31;

// One dense backward block (bwd_block) with the power p - 1 = E fixed at compile time, for the
// sparse scheme's blocks that run densely; false if e is outside [E, EMAX].
template <typename T, int E>
__attribute__((noinline)) static void bwd_block_e(const T* xk, const T* wk, const T* cT, const T* iT, int64_t n0,
                                                  int64_t b0, int64_t b1, int64_t Bp, T* gxk, T* gwk) {
  bwd_block<T, E, false, (E % 2 == 1), false>(xk, wk, cT, iT, n0, b0, b1, Bp, gxk, gwk, E, T(E));
}
template <typename T, int E, int EMAX>
LPD_AI bool bwd_block_fixed(unsigned e, const T* xk, const T* wk, const T* cT, const T* iT, int64_t n0, int64_t b0,
                            int64_t b1, int64_t Bp, T* gxk, T* gwk) {
  if constexpr (E > EMAX) {
    return false;
  } else {
    if (e == static_cast<unsigned>(E)) {
      bwd_block_e<T, E>(xk, wk, cT, iT, n0, b0, b1, Bp, gxk, gwk);
      return true;
    }
    return bwd_block_fixed<T, E + 1, EMAX>(e, xk, wk, cT, iT, n0, b0, b1, Bp, gxk, gwk);
  }
}

// ------------------------------------------------------------------ large p: sparse, in double
// For large p only the coordinates close to a pair's maximum matter: a term with
// |d| <= thr * max contributes at most thr^(p-1) <= 2^-40 of the largest one (thr = 2^(-40/(p-1)),
// the caller's thr_abs = thr * max per pair), so the whole sum, and every gradient, is fixed to
// within D * 2^-40 by the rest. Those few terms are also where float32 is not enough: the rounding
// of d = x - w (2^-24) is amplified p - 1 times by |d|^(p-1). So the kernels below find the terms
// above the threshold with float compares (the forward from per-chunk maxima saved by its max pass,
// the backward by a scan appending, branch-free, every vector with a lane above it to a list), and
// compute just those in double from the exact difference of the inputs (x - w of two floats is exact
// in double).

// t^e (integer, e >= 0) by square-and-multiply, or t^q lane by lane (non-integer q), t >= 0.
LPD_AI DN wpow(DN t, unsigned e, double q, bool integer) {
  if (!integer) {
    for (int i = 0; i < DNL; ++i) t[i] = t[i] > 0.0 ? std::pow(t[i], q) : 0.0;
    return t;
  }
  DN r = t * 0.0 + 1.0;
  while (e) {
    if (e & 1u) r = r * t;
    e >>= 1;
    if (e) t = t * t;
  }
  return r;
}

// t[i] = wpow(t[i]) for the n values of a batch, with the chains of square-and-multiply side by side:
// one value's chain is ~log2(e) dependent multiplies, so alone it waits on latency; n independent
// chains keep the multipliers busy. An integer e comes as ipow_arg gives it: flagged, the two-bit
// window chain of tile_ipow_window runs instead (fewer multiplies, the same accuracy); unflagged,
// the result is wpow's, bit for bit.
template <int n>
LPD_AI void wpow_batch(DN (&t)[n], unsigned e, double q, bool integer) {
  if (!integer) {
    for (int i = 0; i < n; ++i) t[i] = wpow(t[i], 0, q, false);
    return;
  }
  if (e & kIpowWindow) {
    tile_ipow_window<double, n>(t, e & ~kIpowWindow);
    return;
  }
  DN r[n];
  for (int i = 0; i < n; ++i) r[i] = t[i] * 0.0 + 1.0;
  while (e) {
    if (e & 1u)
      for (int i = 0; i < n; ++i) r[i] = r[i] * t[i];
    e >>= 1;
    if (e)
      for (int i = 0; i < n; ++i) t[i] = t[i] * t[i];
  }
  for (int i = 0; i < n; ++i) t[i] = r[i];
}

// Forward for large p, pass 1: the maxima of one R x (NV * L) tile over each chunk of kKC
// coordinates, cm[c * ldc + r * NV * L + v * L + lane] (the pair's maximum is the largest of its
// chunks'). One pass like fwd_max; the chunk maxima let pass 2 skip every chunk of a vector in which
// no lane can hold a term that matters.
constexpr int kKC = kSparseChunk;
template <typename T, int R>
__attribute__((noinline)) static void fwd_max_chunks(const T* __restrict__ x, int64_t ldx, const T* __restrict__ wT,
                                                     int64_t ldw, int64_t D, int64_t ldc, T* __restrict__ cm) {
  using V = LPD_V;
  constexpr int L = Vec<T>::L;
  for (int64_t k0 = 0, c = 0; k0 < D; k0 += kKC, ++c) {
    const int64_t k1 = k0 + kKC < D ? k0 + kKC : D;
    V acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = V{};
    for (int64_t k = k0; k < k1; ++k) {
      const T* wk = wT + k * ldw;
      V w[NV];
      for (int v = 0; v < NV; ++v) w[v] = vload<T>(wk + v * L);
      for (int r = 0; r < R; ++r) {
        const V xb = splat<T>(x[r * ldx + k]);
        for (int v = 0; v < NV; ++v) acc[r][v] = vmax<T>(vabs<T>(xb - w[v]), acc[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) vstore<T>(cm + c * ldc + (r * NV + v) * L, acc[r][v]);
  }
}

// Forward for large p, pass 2, one tile of NT vectors (rows r = j / NV, vectors v = j % NV):
// s[j * L + lane] = sum_k (|d| * inv)^p over the terms with |d| > thr_abs, in double. Only the
// (chunk, vector) pairs whose chunk maximum exceeds gate (just below thr_abs: the float maximum
// of an exact |d| > thr_abs is >= thr_abs) are visited, and in them only the coordinates
// where a lane's float |d| exceeds gate. list: scratch for nc * NT * (H * kKC + 1) entries. Returns false, having
// computed nothing, when more than max_flagged (chunk, vector) pairs are visited (the caller then
// runs the dense float pass, cheaper and accurate enough at such p). map: null, or the tile's
// chunk map for the backward (NT * L pairs x W words), written when it returns true.
template <typename T, int NT>
__attribute__((noinline)) static bool fwd_sparse_gated(const T* __restrict__ x, int64_t ldx, const T* __restrict__ wT,
                                                       int64_t ldw, int64_t D, const T* __restrict__ cm,
                                                       const T* __restrict__ inv, const T* __restrict__ thr_abs,
                                                       const T* __restrict__ gate, double* __restrict__ s, unsigned e,
                                                       double q, bool integer, int64_t max_flagged,
                                                       uint32_t* __restrict__ list, int64_t* __restrict__ map) {
  using V = LPD_V;
  constexpr int L = Vec<T>::L;
  constexpr int H = L / DNL;  // native double vectors per T vector
  const int64_t nc = (D + kKC - 1) / kKC;
  const unsigned ew = integer ? ipow_arg(e) : e;  // the power's chain, picked once
  V gv[NT];
  for (int j = 0; j < NT; ++j) gv[j] = vload<T>(gate + j * L);
  int64_t cnt = 0;  // branch-free append of every flagged (chunk, vector)
  for (int64_t c = 0; c < nc; ++c)
    for (int j = 0; j < NT; ++j) {
      list[cnt] = static_cast<uint32_t>(c * NT + j);
      cnt += many<T>(vgt<T>(vload<T>(cm + (c * NT + j) * L), gv[j]));
    }
  if (cnt > max_flagged) return false;
  if (map) {  // the backward's chunk map: bit c of a pair's word c / 64 set where its chunk c is flagged
    const int64_t W = (nc + 63) / 64;
    for (int64_t i = 0; i < NT * L * W; ++i) map[i] = 0;
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t c = list[i] / NT;
      const int j = static_cast<int>(list[i] % NT);
      unsigned bits = lane_bits<T>(vgt<T>(vload<T>(cm + (c * NT + j) * L), gv[j]));
      while (bits) {
        const int l = __builtin_ctz(bits);
        bits &= bits - 1;
        map[(j * L + l) * W + c / 64] |= static_cast<int64_t>(uint64_t(1) << (c % 64));
      }
    }
  }
  // the (coordinate, vector, half) triples of the flagged pairs where a lane's float |d| reaches
  // gate, appended branch-free: one entry per native double vector (half) with such a lane, so a
  // vector with one term that matters costs one double power, not H
  uint32_t* kl = list + nc * NT;
  int64_t nk = 0;
  constexpr unsigned kHalf = (1u << DNL) - 1u;
  for (int64_t i = 0; i < cnt; ++i) {
    const int64_t c = list[i] / NT;
    const int j = static_cast<int>(list[i] % NT);
    const int r = j / NV, v = j % NV;
    const int64_t k1 = (c + 1) * kKC < D ? (c + 1) * kKC : D;
    for (int64_t k = c * kKC; k < k1; ++k) {
      const unsigned bits =
          lane_bits<T>(vgt<T>(vabs<T>(splat<T>(x[r * ldx + k]) - vload<T>(wT + k * ldw + v * L)), gv[j]));
      for (int h = 0; h < H; ++h) {
        kl[nk] = static_cast<uint32_t>((k * NT + j) * H + h);
        nk += ((bits >> (h * DNL)) & kHalf) != 0u;
      }
    }
  }
  // their terms in double, kSB halves (kSB powers) at a time
  constexpr int kSB = 16;
  for (int i = 0; i < NT * L; ++i) s[i] = 0.0;
  for (int64_t i0 = 0; i0 < nk; i0 += kSB) {
    DN t[kSB];
    for (int i = 0; i < kSB; ++i) {
      const bool real = i0 + i < nk;
      const uint32_t e0 = real ? kl[i0 + i] : kl[i0];
      const int h = static_cast<int>(e0 % H);
      const int64_t k = e0 / H / NT;
      const int j = static_cast<int>((e0 / H) % NT);
      const DN xd = DN{} + static_cast<double>(x[(j / NV) * ldx + k]);
      const DN d = xd - load_dn<T>(wT + k * ldw + (j % NV) * L + h * DNL);  // exact: two floats' difference
      const DN a = (DN)((DNI)d & 0x7fffffffffffffffLL);
      const DNI keep = (a > load_dn<T>(thr_abs + j * L + h * DNL)) & (real ? DNI{} - 1 : DNI{});
      t[i] = (DN)((DNI)(a * load_dn<T>(inv + j * L + h * DNL)) & keep);
    }
    wpow_batch<kSB>(t, ew, q, integer);
    for (int i = 0; i < kSB && i0 + i < nk; ++i) {
      const uint32_t e0 = kl[i0 + i];
      double* sp = s + ((e0 / H) % NT) * L + (e0 % H) * DNL;
      vstore<double>(sp, vload<double>(sp) + t[i]);
    }
  }
  return true;
}

// Backward for large p, rows [b0, b1) of x: as bwd_rows, but only the terms with
// |d| > thr_abs[b, n] (given transposed, (Np, Bp), like c and inv), each computed in double. A block
// (one block of coordinates, BRN rows of w) with more than max_entries rows holding such a term runs
// the dense float block instead. list: scratch for (b1 - b0) * (1 + 2 * BRN) entries.
template <typename T>
__attribute__((noinline)) static void bwd_sparse(const T* __restrict__ x, const T* __restrict__ w,
                                                 const T* __restrict__ cT, const T* __restrict__ iT,
                                                 const T* __restrict__ tT, int64_t b0, int64_t b1, int64_t Bp,
                                                 int64_t Np, int64_t Dp, T* __restrict__ gx, T* __restrict__ gw,
                                                 unsigned e1, double q1, bool integer, int64_t max_entries,
                                                 uint32_t* __restrict__ list) {
  using V = LPD_V;
  constexpr int L = Vec<T>::L;
  constexpr int H = L / DNL;
  constexpr int64_t kSign = static_cast<int64_t>(0x8000000000000000ULL);
  const unsigned ew = integer ? ipow_arg(e1) : e1;  // the power's chain, picked once
  for (int64_t kb = 0; kb < Dp / L; ++kb) {
    const T* xk = x + kb * Bp * L;
    const T* wk = w + kb * Np * L;
    T* gxk = gx + kb * Bp * L;
    T* gwk = gw + kb * Np * L;
    for (int64_t n0 = 0; n0 < Np; n0 += BRN) {
      V wv[BRN];
      for (int j = 0; j < BRN; ++j) wv[j] = vload<T>(wk + (n0 + j) * L);
      int64_t cnt = 0;
      for (int64_t b = b0; b < b1; ++b) {
        const V xv = vload<T>(xk + b * L);
        auto any = vgt<T>(vabs<T>(xv - wv[0]), splat<T>(tT[n0 * Bp + b]));
        for (int j = 1; j < BRN; ++j)
          any = mor<T>(any, vgt<T>(vabs<T>(xv - wv[j]), splat<T>(tT[(n0 + j) * Bp + b])));
        list[cnt] = static_cast<uint32_t>(b);
        cnt += many<T>(any);
        if (cnt > max_entries) break;  // the dense block runs: the rest of the scan is not needed
      }
      if (cnt > max_entries) {  // too many terms matter: the dense float block is cheaper
        if constexpr (sizeof(T) == 4) {
          if (integer && bwd_block_fixed<T, 1, kFixedBwdMax>(e1, xk, wk, cT, iT, n0, b0, b1, Bp, gxk, gwk)) continue;
        }
        if (!integer)
          bwd_block<T, kPowReal, false, false, false>(xk, wk, cT, iT, n0, b0, b1, Bp, gxk, gwk, 0, T(q1));
        else if (e1 % 2 == 1)
          bwd_block<T, kPowInt, false, true, false>(xk, wk, cT, iT, n0, b0, b1, Bp, gxk, gwk, e1, T(q1));
        else
          bwd_block<T, kPowInt, false, false, false>(xk, wk, cT, iT, n0, b0, b1, Bp, gxk, gwk, e1, T(q1));
        continue;
      }
      double gwa[BRN * L];
      for (int i = 0; i < BRN * L; ++i) gwa[i] = 0.0;
      // the (row, w row, half) vectors with a term above the threshold, appended branch-free
      uint32_t* ent = list + (b1 - b0);
      int64_t ne = 0;
      for (int64_t i = 0; i < cnt; ++i) {
        const int64_t b = list[i];
        for (int j = 0; j < BRN; ++j) {
          const double th = static_cast<double>(tT[(n0 + j) * Bp + b]);
          for (int h = 0; h < H; ++h) {
            const DN d = load_dn<T>(xk + b * L + h * DNL) - load_dn<T>(wk + (n0 + j) * L + h * DNL);  // exact
            ent[ne] = static_cast<uint32_t>((i * BRN + j) * H + h);
            ne += any_lane((DN)((DNI)d & 0x7fffffffffffffffLL) > th);
          }
        }
      }
      // their weights, kSB powers side by side
      constexpr int kSB = 8;
      for (int64_t i0 = 0; i0 < ne; i0 += kSB) {
        DN t[kSB], d[kSB];
        int64_t bs[kSB];
        int js[kSB], hs[kSB];
        for (int i = 0; i < kSB; ++i) {
          const bool real = i0 + i < ne;
          const uint32_t e0 = real ? ent[i0 + i] : ent[i0];
          hs[i] = static_cast<int>(e0 % H);
          js[i] = static_cast<int>((e0 / H) % BRN);
          bs[i] = list[e0 / H / BRN];
          const int64_t n = n0 + js[i];
          d[i] = load_dn<T>(xk + bs[i] * L + hs[i] * DNL) - load_dn<T>(wk + n * L + hs[i] * DNL);  // exact
          const DN a = (DN)((DNI)d[i] & 0x7fffffffffffffffLL);
          const DNI keep = (a > static_cast<double>(tT[n * Bp + bs[i]])) & (real ? DNI{} - 1 : DNI{});
          t[i] = (DN)((DNI)(a * static_cast<double>(iT[n * Bp + bs[i]])) & keep);
        }
        wpow_batch<kSB>(t, ew, q1, integer);
        for (int i = 0; i < kSB && i0 + i < ne; ++i) {
          const DN g = (DN)((DNI)t[i] | ((DNI)d[i] & kSign)) * static_cast<double>(cT[(n0 + js[i]) * Bp + bs[i]]);
          T* gp = gxk + bs[i] * L + hs[i] * DNL;
          store_dn<T>(gp, load_dn<T>(gp) + g);
          double* wp = gwa + js[i] * L + hs[i] * DNL;
          vstore<double>(wp, vload<double>(wp) - g);
        }
      }
      for (int j = 0; j < BRN; ++j)
        for (int h = 0; h < H; ++h) store_dn<T>(gwk + (n0 + j) * L + h * DNL, vload<double>(gwa + j * L + h * DNL));
    }
  }
}

// Backward for large p from the forward's chunk map, rows [b0, b1) of x: for every pair (b, n)
// with a non-zero coefficient, only the chunks of kKC coordinates its map flags, and in them the
// terms with |d| > th[b, n], in double, kSB powers side by side. x (B, ld) and w (N, ld) are
// row-major, zero-padded to whole chunks; map (B, N, W); c, iv, th (B, N). Adds into gx (rows of
// x, (B, ld), double) and subtracts from gw (N, ld, double, this worker's own partial).
template <typename T>
__attribute__((noinline)) static void bwd_pairs(const T* __restrict__ x, const T* __restrict__ w, int64_t ld,
                                                const int64_t* __restrict__ map, int64_t W, const T* __restrict__ c,
                                                const T* __restrict__ iv, const T* __restrict__ th, int64_t N,
                                                int64_t b0, int64_t b1, double* __restrict__ gx,
                                                double* __restrict__ gw, unsigned e1, double q1, bool integer) {
  constexpr int HC = kKC / DNL;  // native double vectors per chunk
  static_assert(kKC % DNL == 0, "a chunk must be whole double vectors");
  constexpr int64_t kSign = static_cast<int64_t>(0x8000000000000000ULL);
  constexpr int kSB = 8;
  const unsigned ew = integer ? ipow_arg(e1) : e1;  // the power's chain, picked once
  DN t[kSB], d[kSB];
  double cs[kSB];
  double* gxp[kSB];
  double* gwp[kSB];
  for (int i = 0; i < kSB; ++i) t[i] = DN{};
  int nb = 0;
  auto flush = [&]() {
    wpow_batch<kSB>(t, ew, q1, integer);
    for (int i = 0; i < nb; ++i) {
      const DN g = (DN)((DNI)t[i] | ((DNI)d[i] & kSign)) * cs[i];
      vstore<double>(gxp[i], vload<double>(gxp[i]) + g);
      vstore<double>(gwp[i], vload<double>(gwp[i]) - g);
    }
    nb = 0;
  };
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t pr = b * N + n;
      const double cc = static_cast<double>(c[pr]);
      if (cc == 0.0) continue;
      const double ivd = static_cast<double>(iv[pr]);
      const double thd = static_cast<double>(th[pr]);
      for (int64_t wi = 0; wi < W; ++wi) {
        uint64_t bits = static_cast<uint64_t>(map[pr * W + wi]);
        while (bits) {
          const int64_t k0 = (wi * 64 + __builtin_ctzll(bits)) * kKC;
          if (k0 >= ld) break;  // a dense tile's map flags past the last chunk
          bits &= bits - 1;
          for (int h = 0; h < HC; ++h) {
            const int64_t k = k0 + h * DNL;
            const DN dd = load_dn<T>(x + b * ld + k) - load_dn<T>(w + n * ld + k);  // exact
            const DN a = (DN)((DNI)dd & 0x7fffffffffffffffLL);
            const DNI keep = a > thd;
            if (!any_lane(keep)) continue;
            t[nb] = (DN)((DNI)(a * ivd) & keep);
            d[nb] = dd;
            cs[nb] = cc;
            gxp[nb] = gx + b * ld + k;
            gwp[nb] = gw + n * ld + k;
            if (++nb == kSB) flush();
          }
        }
      }
    }
  if (nb) flush();
}

// The root step of the sparse scheme (sums in double): out = scale * s^(1/p) / inv (the distance
// the forward's own inv implies), r = s^((1 - p) / p); edge cases as finish_tile.
template <typename T>
static void finish_sparse(int NT, double p, T scale, const T* m, const T* iv, const double* sd, T* out, T* inv,
                          T* r) {
  const double q = 1.0 / p;
  for (int i0 = 0; i0 < NT; i0 += DNL) {
    DN sv;
    for (int l = 0; l < DNL; ++l) {
      const double v = sd[i0 + l];
      sv[l] = (v > 1e-300 && v < 1e300) ? v : 1.0;
    }
    DN root;
    if constexpr (sizeof(T) == 4) {
      root = dpow_pos(sv, q);
    } else {
      for (int l = 0; l < DNL; ++l) root[l] = std::pow(sv[l], q);
    }
    for (int l = 0; l < DNL; ++l) {
      const int j = i0 + l;
      const double mm = static_cast<double>(m[j]);
      if (!(mm > 0.0)) {
        out[j] = static_cast<T>(mm);
        if (inv) { inv[j] = T(0); r[j] = mm == 0.0 ? T(0) : static_cast<T>(NAN); }
      } else if (std::isinf(mm)) {
        out[j] = static_cast<T>(INFINITY);
        if (inv) { inv[j] = T(0); r[j] = static_cast<T>(NAN); }
      } else {
        out[j] = static_cast<T>(static_cast<double>(scale) * root[l] / static_cast<double>(iv[j]));
        if (inv) { inv[j] = iv[j]; r[j] = static_cast<T>(root[l] / sv[l]); }
      }
    }
  }
}

// ---------------------------------------------------------------------------- entry points
// fwd_pow_sum with E = e fixed at compile time, for E in [E0, EMAX]; false if e is outside.
template <typename T, int R, bool SCALED, int E, int EMAX>
LPD_AI bool pow_sum_fixed(unsigned e, const T* x, int64_t ldx, const T* wT, int64_t ldw, int64_t D, const T* inv,
                          T* s) {
  if constexpr (E > EMAX) {
    return false;
  } else {
    if (e == static_cast<unsigned>(E)) {
      fwd_pow_sum<T, R, E, SCALED, (E % 2 == 1)>(x, ldx, wT, ldw, D, inv, s, E, T(E));
      return true;
    }
    return pow_sum_fixed<T, R, SCALED, E + 1, EMAX>(e, x, ldx, wT, ldw, D, inv, s);
  }
}

template <typename T, int R, bool SCALED>
static void pow_sum(const Plan& pl, const T* x, int64_t ldx, const T* wT, int64_t ldw, int64_t D, const T* inv,
                    T* s) {
  if constexpr (sizeof(T) == 4) {
    if (pl.integer && pow_sum_fixed<T, R, SCALED, 2, (SCALED ? kFixedFwdMax : 16)>(pl.e, x, ldx, wT, ldw, D, inv, s))
      return;
  }
  const T q = static_cast<T>(pl.p);
  switch (pl.fwd_pow) {
    case kFwd2: fwd_pow_sum<T, R, 2, SCALED, false>(x, ldx, wT, ldw, D, inv, s, 2, q); break;
    case kFwd8: fwd_pow_sum<T, R, 8, SCALED, false>(x, ldx, wT, ldw, D, inv, s, 8, q); break;
    case kFwdIntEven: fwd_pow_sum<T, R, kPowInt, SCALED, false>(x, ldx, wT, ldw, D, inv, s, pl.e, q); break;
    case kFwdIntOdd: fwd_pow_sum<T, R, kPowInt, SCALED, true>(x, ldx, wT, ldw, D, inv, s, pl.e, q); break;
    default: fwd_pow_sum<T, R, kPowReal, SCALED, true>(x, ldx, wT, ldw, D, inv, s, 0, q); break;
  }
}

constexpr int kRT = RB > RBS ? (RB > RBI ? RB : RBI) : (RBS > RBI ? RBS : RBI);  // rows of a tile
static_assert(kRT % RB == 0 && kRT % RBI == 0 && kRT % RBS == 0, "row tiles must nest");

// One kRT x (NV * L) tile of the forward, every scheme: out/idx/inv/r are kRT x NB row-major;
// rows/cols: the valid part (the pre-scaled scheme's check ignores the padding). idx: the arg-max
// (p = inf), or for the sparse scheme the backward's chunk map, kRT x NB x W words (W = ceil(nc /
// 64)); null when not wanted.
template <typename T>
static void fwd_tile(const Plan& pl, const T* x, int64_t ldx, const T* wT, int64_t ldw, int64_t D, int rows,
                     int cols, T* out, int64_t* idx, T* inv, T* r, uint32_t* scratch) {
  constexpr int NB = NV * Vec<T>::L;
  constexpr int RT = kRT;
  if (pl.kind == kInf) {
    if (pl.stats) {
      for (int rr = 0; rr < RT; rr += RBI)
        fwd_max<T, RBI, true>(x + rr * ldx, ldx, wT, ldw, D, out + rr * NB, idx + rr * NB);
    } else {
      for (int rr = 0; rr < RT; rr += RB) fwd_max<T, RB, false>(x + rr * ldx, ldx, wT, ldw, D, out + rr * NB, nullptr);
    }
    return;
  }
  if (pl.kind == kOne) {
    for (int rr = 0; rr < RT; rr += RBS)
      fwd_pow_sum<T, RBS, 1, false, true>(x + rr * ldx, ldx, wT, ldw, D, nullptr, out + rr * NB, 1, T(1));
    return;
  }
  alignas(64) T s[RT * NB];
  const T sc = static_cast<T>(pl.scale);
  if (pl.kind == kSingle) {
    for (int rr = 0; rr < RT; rr += RBS) pow_sum<T, RBS, false>(pl, x + rr * ldx, ldx, wT, ldw, D, nullptr, s + rr * NB);
    bool ok = true;
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j) ok &= s[i * NB + j] >= T(kSingleMinSum);
    if (ok) {
      finish_tile<T, false>(RT * NB, pl.p, sc, nullptr, s, out, inv, r);
      return;
    }
  }
  alignas(64) T m[RT * NB];
  alignas(64) T iv[RT * NB];
  const T big = std::numeric_limits<T>::infinity();
  if (pl.sparse) {
    // pass 1: chunk maxima (scratch: nc * RT * NB values of T, then the list of pass 2)
    constexpr int NT = RT * NV;
    const int64_t nc = (D + kKC - 1) / kKC;
    T* cm = reinterpret_cast<T*>(scratch);
    uint32_t* list = scratch + nc * RT * NB * (sizeof(T) / sizeof(uint32_t));
    for (int rr = 0; rr < RT; rr += RB) fwd_max_chunks<T, RB>(x + rr * ldx, ldx, wT, ldw, D, RT * NB, cm + rr * NB);
    for (int j = 0; j < NT; ++j) {
      LPD_V a = vload<T>(cm + j * Vec<T>::L);
      for (int64_t c = 1; c < nc; ++c) a = vmax<T>(vload<T>(cm + (c * NT + j) * Vec<T>::L), a);
      vstore<T>(m + j * Vec<T>::L, a);
    }
    alignas(64) T th[RT * NB];
    alignas(64) T gate[RT * NB];
    alignas(64) double sd[RT * NB];
    for (int i = 0; i < RT * NB; ++i) {
      iv[i] = (m[i] > T(0) && m[i] < big) ? T(1) / m[i] : T(0);
      th[i] = m[i] * static_cast<T>(pl.thr);
      // a little below th: the float maximum of an exact |d| > th is >= th, and the backward's
      // threshold (thr / inv) may differ from th by a few ulps
      gate[i] = th[i] * (T(1) - T(0x1p-20));
    }
    const bool sparse = fwd_sparse_gated<T, NT>(x, ldx, wT, ldw, D, cm, iv, th, gate, sd, pl.e, pl.p, pl.integer,
                                                pl.dense_ok ? nc * NT / 2 : nc * NT, list, idx);
    if (!sparse) {
      for (int rr = 0; rr < RT; rr += RBS)
        pow_sum<T, RBS, true>(pl, x + rr * ldx, ldx, wT, ldw, D, iv + rr * NB, s + rr * NB);
      for (int i = 0; i < RT * NB; ++i) sd[i] = s[i];
    }
    if (idx && !sparse)  // a dense tile: its map flags every chunk (bits past the last are ignored)
      for (int64_t i = 0; i < RT * NB * ((nc + 63) / 64); ++i) idx[i] = -1;
    finish_sparse<T>(RT * NB, pl.p, sc, m, iv, sd, out, inv, r);
    return;
  }
  for (int rr = 0; rr < RT; rr += RB) fwd_max<T, RB, false>(x + rr * ldx, ldx, wT, ldw, D, m + rr * NB, nullptr);
  for (int i = 0; i < RT * NB; ++i) iv[i] = (m[i] > T(0) && m[i] < big) ? T(1) / m[i] : T(0);
  for (int rr = 0; rr < RT; rr += RBS) pow_sum<T, RBS, true>(pl, x + rr * ldx, ldx, wT, ldw, D, iv + rr * NB, s + rr * NB);
  finish_tile<T, true>(RT * NB, pl.p, sc, m, s, out, inv, r);
}

// bwd_rows with E = e (the power p - 1) fixed at compile time, for E in [E0, EMAX].
template <typename T, bool UNIT, int E, int EMAX>
LPD_AI bool bwd_fixed(unsigned e, const T* x, const T* w, const T* cT, const T* iT, int64_t b0, int64_t b1,
                      int64_t Bp, int64_t Np, int64_t Dp, T* gx, T* gw) {
  if constexpr (E > EMAX) {
    return false;
  } else {
    if (e == static_cast<unsigned>(E)) {
      bwd_rows<T, E, false, (E % 2 == 1), UNIT>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, E, T(E));
      return true;
    }
    return bwd_fixed<T, UNIT, E + 1, EMAX>(e, x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw);
  }
}

// The backward of rows [b0, b1) by scheme; UNIT: every pair's inv is 1 (the pre-scaled scheme).
template <typename T, bool UNIT>
static void bwd_dense(const Plan& pl, const T* x, const T* w, const T* cT, const T* iT, int64_t b0, int64_t b1,
                      int64_t Bp, int64_t Np, int64_t Dp, T* gx, T* gw) {
  const T q = static_cast<T>(pl.p - 1.0);
  const unsigned e1 = pl.e > 0 ? pl.e - 1 : 0;
  if (pl.bwd_pow == kBwdSign) {
    bwd_rows<T, 1, true, true, true>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, 0, q);
    return;
  }
  if constexpr (sizeof(T) == 4) {
    if (pl.integer && bwd_fixed<T, UNIT, 1, kFixedBwdMax>(e1, x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw)) return;
  }
  switch (pl.bwd_pow) {
    case kBwd1: bwd_rows<T, 1, false, true, UNIT>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, 1, q); break;
    case kBwd7: bwd_rows<T, 7, false, true, UNIT>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, 7, q); break;
    case kBwdIntOdd: bwd_rows<T, kPowInt, false, true, UNIT>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, e1, q); break;
    case kBwdIntEven: bwd_rows<T, kPowInt, false, false, UNIT>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, e1, q); break;
    default: bwd_rows<T, kPowReal, false, false, UNIT>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, 0, q); break;
  }
}

template <typename T>
static void bwd(const Plan& pl, const T* x, const T* w, const T* cT, const T* iT, const T* tT, int64_t b0,
                int64_t b1, int64_t Bp, int64_t Np, int64_t Dp, T* gx, T* gw, uint32_t* scratch) {
  if (pl.sparse) {
    bwd_sparse<T>(x, w, cT, iT, tT, b0, b1, Bp, Np, Dp, gx, gw, pl.e > 0 ? pl.e - 1 : 0, pl.p - 1.0, pl.integer,
                  pl.dense_ok ? (b1 - b0) / 4 : b1 - b0, scratch);
  } else if (pl.kind == kSingle) {
    bwd_dense<T, true>(pl, x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw);
  } else {
    bwd_dense<T, false>(pl, x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw);
  }
}

// Non-template entries (what the run-time dispatch of lp_dist.cpp points at), instantiated inside
// this copy's target region.
static void fwd_f32(const Plan& pl, const float* x, int64_t ldx, const float* wT, int64_t ldw, int64_t D, int rows,
                    int cols, float* out, int64_t* idx, float* inv, float* r, uint32_t* sc) {
  fwd_tile<float>(pl, x, ldx, wT, ldw, D, rows, cols, out, idx, inv, r, sc);
}
static void fwd_f64(const Plan& pl, const double* x, int64_t ldx, const double* wT, int64_t ldw, int64_t D, int rows,
                    int cols, double* out, int64_t* idx, double* inv, double* r, uint32_t* sc) {
  fwd_tile<double>(pl, x, ldx, wT, ldw, D, rows, cols, out, idx, inv, r, sc);
}
static void bwd_f32(const Plan& pl, const float* x, const float* w, const float* cT, const float* iT, const float* tT,
                    int64_t b0, int64_t b1, int64_t Bp, int64_t Np, int64_t Dp, float* gx, float* gw, uint32_t* sc) {
  bwd<float>(pl, x, w, cT, iT, tT, b0, b1, Bp, Np, Dp, gx, gw, sc);
}
static void bwdp_f32(const float* x, const float* w, int64_t ld, const int64_t* map, int64_t W, const float* c,
                     const float* iv, const float* th, int64_t N, int64_t b0, int64_t b1, double* gx, double* gw,
                     unsigned e1, double q1, bool integer) {
  bwd_pairs<float>(x, w, ld, map, W, c, iv, th, N, b0, b1, gx, gw, e1, q1, integer);
}
static void bwdp_f64(const double* x, const double* w, int64_t ld, const int64_t* map, int64_t W, const double* c,
                     const double* iv, const double* th, int64_t N, int64_t b0, int64_t b1, double* gx, double* gw,
                     unsigned e1, double q1, bool integer) {
  bwd_pairs<double>(x, w, ld, map, W, c, iv, th, N, b0, b1, gx, gw, e1, q1, integer);
}
static void bwd_f64(const Plan& pl, const double* x, const double* w, const double* cT, const double* iT,
                    const double* tT, int64_t b0, int64_t b1, int64_t Bp, int64_t Np, int64_t Dp, double* gx,
                    double* gw, uint32_t* sc) {
  bwd<double>(pl, x, w, cT, iT, tT, b0, b1, Bp, Np, Dp, gx, gw, sc);
}

}  // namespace LPD_NS

// Each inclusion instantiates one copy; the parameters are cleared for the next one.
#undef LPD_AI
#undef LPD_V
#undef LPD_I
#undef LPD_M
#undef LPD_NS
#undef LPD_VB
#undef LPD_ISA
#undef LPD_RB
#undef LPD_RBI
#undef LPD_RBS
#undef LPD_NV
#undef LPD_BRB
#undef LPD_BRN
