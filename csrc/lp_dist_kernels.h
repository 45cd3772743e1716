// Micro-kernels of drp::lp_dist_cpu_* for one instruction set.
//
// No include guard on purpose: lp_dist.cpp includes this file once per instruction set,
// each time inside a different `#pragma GCC target` region and with these macros set:
//   LPD_NS   namespace of this copy          LPD_VB   bytes per SIMD vector (16, 32, 64)
//   LPD_RB   rows of x per forward tile      LPD_NV   vectors of w columns per forward tile
//   LPD_BRB  rows of x per backward step     LPD_BRN  rows of w per backward step
// The kernels are written with GCC vector extensions, so one source gives SSE2, AVX2 and
// AVX-512 code; the caller picks the widest copy the CPU supports at run time.
//
// Layouts (all padded by the caller, so there is no tail handling here):
//   forward:  x (Bp, D) row-major, wT (D, Np) = w transposed, Np a multiple of NV * lanes;
//             a tile is RB rows of x times NV * lanes columns of wT, accumulated over k
//             as an outer product (each loaded w vector is reused by RB rows).
//   backward: x (Bp, Dp), w (Np, Dp) row-major, Dp a multiple of lanes; the coefficient
//             g[b, n] and the inverse distance 1 / out[b, n] are given transposed, (Np, Bp).

// PowMode (kPow*) and PowPlan come from the enclosing namespace (lp_dist.cpp).
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
constexpr int NV = LPD_NV;
constexpr int BRB = LPD_BRB;
constexpr int BRN = LPD_BRN;

template <typename T>
static inline __attribute__((always_inline)) typename Vec<T>::V vload(const T* p) {
  typename Vec<T>::V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
static inline __attribute__((always_inline)) void vstore(T* p, typename Vec<T>::V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
template <typename T>
static inline __attribute__((always_inline)) typename Vec<T>::V vabs(typename Vec<T>::V d) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  return (V)((I)d & Vec<T>::kAbs);
}

// t^e for a compile-time or run-time exponent (t >= 0); E < 0 means "use e".
template <typename T, int E>
static inline __attribute__((always_inline)) typename Vec<T>::V vpow_int(typename Vec<T>::V t, int e) {
  using V = typename Vec<T>::V;
  if constexpr (E == 1) {
    return t;
  } else if constexpr (E == 2) {
    return t * t;
  } else if constexpr (E == 7) {
    const V t2 = t * t;
    const V t3 = t2 * t;
    const V t6 = t3 * t3;
    return t6 * t;
  } else if constexpr (E == 8) {
    const V t2 = t * t;
    const V t4 = t2 * t2;
    return t4 * t4;
  } else {
    V r = V{} + T(1);
    while (true) {
      if (e & 1) r *= t;
      e >>= 1;
      if (!e) break;
      t *= t;
    }
    return r;
  }
}

// t^q = exp2(q * log2(t)) for float vectors, 0 <= t <= 1, q > 0 (0^q = 0). log(m) on
// [sqrt(1/2), sqrt(2)) and 2^f on [-1/2, 1/2] are the minimax polynomials of Cephes' logf and
// exp2f (relative error ~1e-7 each); results below 2^-126 are flushed to 0.
static inline __attribute__((always_inline)) Vec<float>::V vpow_real_f32(Vec<float>::V t, float q) {
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
static inline typename Vec<T>::V vpow_real(typename Vec<T>::V t, T q) {
  if constexpr (sizeof(T) == 4) {
    return vpow_real_f32(t, q);
  }
  using V = typename Vec<T>::V;
  T lanes[Vec<T>::L];
  __builtin_memcpy(lanes, &t, sizeof(t));
  for (int i = 0; i < Vec<T>::L; ++i) lanes[i] = lanes[i] > T(0) ? std::pow(lanes[i], q) : T(0);
  V r;
  __builtin_memcpy(&r, lanes, sizeof(r));
  return r;
}

// t^e / t^q by mode. For the run-time modes, t below thr (where t^e would leave the normal range
// and x86 would take a slow denormal assist on every multiply) is flushed to 0 first: such terms
// are below 2^-100 (float) / 2^-900 (double) of the largest one, which is 1.
template <typename T, int MODE>
static inline __attribute__((always_inline)) typename Vec<T>::V vpow(typename Vec<T>::V t, int e, T q, T thr) {
  using V = typename Vec<T>::V;
  if constexpr (MODE == kPowReal) {
    return vpow_real<T>(t >= thr ? t : V{}, q);
  } else if constexpr (MODE == kPowInt) {
    return vpow_int<T, MODE>(t >= thr ? t : V{}, e);
  } else {
    (void)thr;
    return vpow_int<T, MODE>(t, e);
  }
}

// The flush threshold of vpow for the exponent q: thr^q = 2^-100 (float) or 2^-900 (double).
template <typename T>
static inline T flush_below(double q) {
  return q > 0 ? static_cast<T>(std::exp2((sizeof(T) == 4 ? -100.0 : -900.0) / q)) : T(0);
}

template <typename T>
static inline __attribute__((always_inline)) typename Vec<T>::V vbcast(T s) {
  typename Vec<T>::V v;
  for (int i = 0; i < Vec<T>::L; ++i) v[i] = s;
  return v;
}

// ------------------------------------------------------------------ forward
// Max over k of |x[r, k] - wT[k, c]| for an RB x (NV * L) tile; with IDX also the first
// arg-max k (strict >, so ties keep the earliest k). NaN is ignored here; the caller
// patches pairs whose rows hold a NaN.
template <typename T, bool IDX>
static void tile_max(const T* __restrict__ x, int64_t ldx, const T* __restrict__ wT, int64_t ldw, int64_t D,
                     T* __restrict__ m_out, int64_t* __restrict__ idx_out) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  using IS = typename Vec<T>::IS;
  constexpr int L = Vec<T>::L;
  V acc[RB][NV];
  I id[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = V{};
      id[r][v] = I{};
    }
  for (int64_t k = 0; k < D; ++k) {
    const T* wk = wT + k * ldw;
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload<T>(wk + v * L);
    const I kv = I{} + static_cast<IS>(k);
    for (int r = 0; r < RB; ++r) {
      const V xb = vbcast<T>(x[r * ldx + k]);
      for (int v = 0; v < NV; ++v) {
        const V a = vabs<T>(xb - w[v]);
        if constexpr (IDX) {
          const I gt = a > acc[r][v];
          acc[r][v] = gt ? a : acc[r][v];
          id[r][v] = gt ? kv : id[r][v];
        } else {
          acc[r][v] = a > acc[r][v] ? a : acc[r][v];
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      vstore<T>(m_out + r * NV * L + v * L, acc[r][v]);
      if constexpr (IDX) {
        IS tmp[L];
        __builtin_memcpy(tmp, &id[r][v], sizeof(tmp));
        for (int i = 0; i < L; ++i) idx_out[r * NV * L + v * L + i] = tmp[i];
      }
    }
}

#if LPD_VB == 64
// The same for float on AVX-512, written with intrinsics: GCC lowers the vector ternaries
// above to a compare per select; here one compare feeds a max and a masked index move.
template <>
void tile_max<float, true>(const float* __restrict__ x, int64_t ldx, const float* __restrict__ wT, int64_t ldw,
                           int64_t D, float* __restrict__ m_out, int64_t* __restrict__ idx_out) {
  __m512 acc[RB][NV];
  __m512i id[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = _mm512_setzero_ps();
      id[r][v] = _mm512_setzero_si512();
    }
  for (int64_t k = 0; k < D; ++k) {
    const float* wk = wT + k * ldw;
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(wk + v * 16);
    const __m512i kv = _mm512_set1_epi32(static_cast<int32_t>(k));
    for (int r = 0; r < RB; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
      for (int v = 0; v < NV; ++v) {
        const __m512 a = _mm512_abs_ps(_mm512_sub_ps(xb, w[v]));
        const __mmask16 gt = _mm512_cmp_ps_mask(a, acc[r][v], _CMP_GT_OQ);
        acc[r][v] = _mm512_max_ps(a, acc[r][v]);
        id[r][v] = _mm512_mask_mov_epi32(id[r][v], gt, kv);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      _mm512_storeu_ps(m_out + r * NV * 16 + v * 16, acc[r][v]);
      int32_t tmp[16];
      _mm512_storeu_si512(tmp, id[r][v]);
      for (int i = 0; i < 16; ++i) idx_out[r * NV * 16 + v * 16 + i] = tmp[i];
    }
}

template <>
void tile_max<float, false>(const float* __restrict__ x, int64_t ldx, const float* __restrict__ wT, int64_t ldw,
                            int64_t D, float* __restrict__ m_out, int64_t* __restrict__) {
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < D; ++k) {
    const float* wk = wT + k * ldw;
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(wk + v * 16);
    for (int r = 0; r < RB; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_max_ps(_mm512_abs_ps(_mm512_sub_ps(xb, w[v])), acc[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(m_out + r * NV * 16 + v * 16, acc[r][v]);
}
#endif

// sum over k of (|x[r, k] - wT[k, c]| * inv[r, c])^p for an RB x (NV * L) tile.
template <typename T, int MODE>
static void tile_sum(const T* __restrict__ x, int64_t ldx, const T* __restrict__ wT, int64_t ldw, int64_t D,
                     const T* __restrict__ inv, T* __restrict__ s_out, int e, T q) {
  const T thr = flush_below<T>(static_cast<double>(q));
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::L;
  V acc[RB][NV];
  V iv[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = V{};
      iv[r][v] = MODE == kPow1 ? V{} : vload<T>(inv + r * NV * L + v * L);
    }
  for (int64_t k = 0; k < D; ++k) {
    const T* wk = wT + k * ldw;
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload<T>(wk + v * L);
    for (int r = 0; r < RB; ++r) {
      const V xb = vbcast<T>(x[r * ldx + k]);
      for (int v = 0; v < NV; ++v) {
        if constexpr (MODE == kPow1) {
          acc[r][v] += vabs<T>(xb - w[v]);  // p = 1 needs no scaling
        } else {
          acc[r][v] += vpow<T, MODE>(vabs<T>(xb - w[v]) * iv[r][v], e, q, thr);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) vstore<T>(s_out + r * NV * L + v * L, acc[r][v]);
}

// ----------------------------------------------------------------- backward
// For rows b in [b0, b1) (multiples of BRB) and all Np rows of w:
//   gx[b, k] += sum_n c[b, n] * sign(d) * (|d| * inv[b, n])^(p - 1),   d = x[b, k] - w[n, k]
//   gw[n, k]  = -sum_{b in [b0, b1)} (the same terms)              (written, not added)
// MODE is the power of p - 1 (kPow1 there means p = 2; p = 1 is SIGN_ONLY).
template <typename T, int MODE, bool SIGN_ONLY>
static void bwd_rows(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ cT,
                     const T* __restrict__ iT, int64_t b0, int64_t b1, int64_t Bp, int64_t Np, int64_t Dp,
                     T* __restrict__ gx, T* __restrict__ gw, int e, T q) {
  const T thr = flush_below<T>(static_cast<double>(q));
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr int L = Vec<T>::L;
  const I sign_mask = I{} + static_cast<typename Vec<T>::IS>(~Vec<T>::kAbs);
  const V one = V{} + T(1);
  const V zero = V{};
  for (int64_t kc = 0; kc < Dp; kc += L) {
    for (int64_t n0 = 0; n0 < Np; n0 += BRN) {
      V wv[BRN];
      V gwa[BRN];
      for (int j = 0; j < BRN; ++j) {
        wv[j] = vload<T>(w + (n0 + j) * Dp + kc);
        gwa[j] = V{};
      }
      for (int64_t b = b0; b < b1; b += BRB) {
        V xv[BRB];
        V gxa[BRB];
        for (int r = 0; r < BRB; ++r) {
          xv[r] = vload<T>(x + (b + r) * Dp + kc);
          gxa[r] = V{};
        }
        for (int j = 0; j < BRN; ++j) {
          const T* crow = cT + (n0 + j) * Bp + b;
          const T* irow = iT + (n0 + j) * Bp + b;
          for (int r = 0; r < BRB; ++r) {
            const V d = xv[r] - wv[j];
            V s;
            if constexpr (SIGN_ONLY) {
              s = ((d > zero ? one : zero) - (d < zero ? one : zero)) * crow[r];
            } else {
              const V t = vabs<T>(d) * irow[r];
              const V qv = vpow<T, MODE>(t, e, q, thr);
              s = (V)((I)qv | ((I)d & sign_mask)) * crow[r];
            }
            gxa[r] += s;
            gwa[j] -= s;
          }
        }
        for (int r = 0; r < BRB; ++r) {
          T* gp = gx + (b + r) * Dp + kc;
          vstore<T>(gp, vload<T>(gp) + gxa[r]);
        }
      }
      for (int j = 0; j < BRN; ++j) vstore<T>(gw + (n0 + j) * Dp + kc, gwa[j]);
    }
  }
}

// ------------------------------------------------------------------ entries
// One forward tile: RB rows of x times NV * L columns of wT. out/idx are RB x (NV * L).
// With m_save / s_save (finite p > 1 only) the tile's max m and scaled sum s are stored too.
template <typename T>
static void fwd_tile_impl(const T* x, int64_t ldx, const T* wT, int64_t ldw, int64_t D, double p,
                          const PowPlan& plan, T* out, int64_t* idx, T* m_save, T* s_save) {
  constexpr int NT = RB * NV * Vec<T>::L;
  if (p == __builtin_inf()) {
    tile_max<T, true>(x, ldx, wT, ldw, D, out, idx);
    return;
  }
  const T qf = static_cast<T>(p);
  if (plan.sign_only) {
    tile_sum<T, kPow1>(x, ldx, wT, ldw, D, nullptr, out, 1, qf);
    return;
  }
  T m[NT], inv[NT], s[NT];
  tile_max<T, false>(x, ldx, wT, ldw, D, m, nullptr);
  const T big = std::numeric_limits<T>::infinity();
  for (int i = 0; i < NT; ++i) inv[i] = (m[i] > T(0) && m[i] < big) ? T(1) / m[i] : T(0);
  switch (plan.fwd_mode) {
    case kPow2: tile_sum<T, kPow2>(x, ldx, wT, ldw, D, inv, s, 2, qf); break;
    case kPow8: tile_sum<T, kPow8>(x, ldx, wT, ldw, D, inv, s, 8, qf); break;
    case kPowInt: tile_sum<T, kPowInt>(x, ldx, wT, ldw, D, inv, s, plan.e_fwd, qf); break;
    default: tile_sum<T, kPowReal>(x, ldx, wT, ldw, D, inv, s, 0, qf); break;
  }
  if (m_save) {
    for (int i = 0; i < NT; ++i) {
      m_save[i] = m[i];
      s_save[i] = s[i];
    }
  }
  const double rp = 1.0 / p;
  for (int i = 0; i < NT; ++i) {
    if (m[i] == T(0) || m[i] == big) {
      out[i] = m[i];
    } else {
      out[i] = static_cast<T>(static_cast<double>(m[i]) * std::pow(static_cast<double>(s[i]), rp));
    }
  }
}

template <typename T>
static void bwd_rows_impl(const T* x, const T* w, const T* cT, const T* iT, int64_t b0, int64_t b1, int64_t Bp,
                          int64_t Np, int64_t Dp, T* gx, T* gw, double p, const PowPlan& plan) {
  const T q = static_cast<T>(p - 1.0);
  if (plan.sign_only) {
    bwd_rows<T, kPow1, true>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, 0, q);
    return;
  }
  switch (plan.bwd_mode) {
    case kPow1: bwd_rows<T, kPow1, false>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, 1, q); break;
    case kPow7: bwd_rows<T, kPow7, false>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, 7, q); break;
    case kPowInt: bwd_rows<T, kPowInt, false>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, plan.e_bwd, q); break;
    default: bwd_rows<T, kPowReal, false>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, 0, q); break;
  }
}

// Non-template entry points (what the run-time dispatch of lp_dist.cpp points at).
static void fwd_tile_f32(const float* x, int64_t ldx, const float* wT, int64_t ldw, int64_t D, double p,
                         const PowPlan& plan, float* out, int64_t* idx, float* m_save, float* s_save) {
  fwd_tile_impl<float>(x, ldx, wT, ldw, D, p, plan, out, idx, m_save, s_save);
}
static void fwd_tile_f64(const double* x, int64_t ldx, const double* wT, int64_t ldw, int64_t D, double p,
                         const PowPlan& plan, double* out, int64_t* idx, double* m_save, double* s_save) {
  fwd_tile_impl<double>(x, ldx, wT, ldw, D, p, plan, out, idx, m_save, s_save);
}
static void bwd_rows_f32(const float* x, const float* w, const float* cT, const float* iT, int64_t b0, int64_t b1,
                         int64_t Bp, int64_t Np, int64_t Dp, float* gx, float* gw, double p, const PowPlan& plan) {
  bwd_rows_impl<float>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, p, plan);
}
static void bwd_rows_f64(const double* x, const double* w, const double* cT, const double* iT, int64_t b0,
                         int64_t b1, int64_t Bp, int64_t Np, int64_t Dp, double* gx, double* gw, double p,
                         const PowPlan& plan) {
  bwd_rows_impl<double>(x, w, cT, iT, b0, b1, Bp, Np, Dp, gx, gw, p, plan);
}

}  // namespace LPD_NS

// Each inclusion instantiates one copy; the parameters are cleared for the next one.
#undef LPD_NS
#undef LPD_VB
#undef LPD_RB
#undef LPD_NV
#undef LPD_BRB
#undef LPD_BRN
