// drp_kernels.ops._C: the per-query bookkeeping of the L-inf Square Attack on the CPU, fused
// (drp_kernels/attacks/square.py). Each query of the attack is one forward pass of the model
// plus, around it, a proposal and an acceptance; done with PyTorch ops these take about a dozen
// small kernels each (a window mask, where, clamp, an equality test, the margin, two wheres),
// which on the CPU cost 0.1-1 ms per query for 7-145 points of 28x28, as much as a small
// model's forward. Here each is one pass over the working batch.
//
// Schemas: TORCH_LIBRARY_FRAGMENT(drp, m) (the library itself is defined in drp.cpp).
//   square_propose_cpu(x, x_best, eps, vh, vw, s, signs) -> x_new
//     x, x_best: (k, c, h, w) contiguous; eps: (k,) of x's dtype; vh, vw: (k,) int64 window
//     corners with 0 <= vh <= h - s, 0 <= vw <= w - s; signs: (k, c) of x's dtype, +1 or -1.
//     x_new = x_best, except on the s x s window at (vh, vw) of every channel, where it is
//     clamp(x + eps * sign, 0, 1). A proposal equal to x_best everywhere would waste the query;
//     there channel 0's sign is flipped and its window written again.
//   square_accept_cpu_(x_best!, margin_best!, x_new, logits, y) -> broken
//     margin = z_y - max_{i != y} z_i in float32 (NaN in a row gives NaN); where it is below
//     margin_best, x_best and margin_best take the proposal's. Returns how many points have
//     margin_best <= 0 afterwards (broken), as a 0-d int64 tensor (so the op traces like any other).
//   square_draws_cpu(keys, counter, bounds, n_signs, dtype) -> (ints, signs)
//     The per-point keyed draws of one query (drp_kernels/attacks/_keys.py `bits`): with n =
//     len(bounds) + n_signs and b_j = mix64(key + (counter * n + j + 1) * golden) (block `counter`
//     of the splitmix64 stream seeded with the key), ints[j, i] = (b_j >>> 1) mod bounds[j] for
//     j < len(bounds) (int64, (len(bounds), k), so each row is contiguous) and
//     signs[i, m] = b_{len(bounds) + m} < 2^63 ? +1 : -1 ((k, n_signs) of dtype).
// The first two reproduce the PyTorch formulation bit for bit: the same operations in the same
// order and dtype (x + (eps * sign), then the clamp; the margin in float32). The draws are
// integer arithmetic mod 2^64, identical to _keys.py's int64 tensor version on any device.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace drp {
namespace sq {
namespace {

using at::Tensor;

// Points per parallel task: below ~64 points the work is a few microseconds, threads cost more.
constexpr int64_t kGrain = 64;

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <typename T>
inline T clamp01(T v) {
  // NaN passes through, like torch.clamp
  if (v < T(0)) return T(0);
  if (v > T(1)) return T(1);
  return v;
}

Tensor square_propose_cpu(const Tensor& x, const Tensor& xb, const Tensor& eps, const Tensor& vh, const Tensor& vw,
                          int64_t s, const Tensor& signs) {
  check_cpu(x, "x");
  check_cpu(xb, "x_best");
  check_cpu(eps, "eps");
  check_cpu(vh, "vh");
  check_cpu(vw, "vw");
  check_cpu(signs, "signs");
  TORCH_CHECK(x.dim() == 4, "x must be (k, c, h, w), got shape ", x.sizes());
  TORCH_CHECK(xb.sizes() == x.sizes(), "x_best must have x's shape ", x.sizes(), ", got ", xb.sizes());
  const int64_t k = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(xb.scalar_type() == x.scalar_type() && eps.scalar_type() == x.scalar_type() &&
                  signs.scalar_type() == x.scalar_type(),
              "x_best, eps and signs must have x's dtype ", x.scalar_type());
  TORCH_CHECK(eps.dim() == 1 && eps.size(0) == k, "eps must be (k,) = (", k, ",), got ", eps.sizes());
  TORCH_CHECK(signs.dim() == 2 && signs.size(0) == k && signs.size(1) == c, "signs must be (k, c) = (", k, ", ", c,
              "), got ", signs.sizes());
  TORCH_CHECK(vh.scalar_type() == at::kLong && vw.scalar_type() == at::kLong, "vh and vw must be int64");
  TORCH_CHECK(vh.dim() == 1 && vh.size(0) == k && vw.dim() == 1 && vw.size(0) == k, "vh and vw must be (k,) = (", k,
              ",)");
  TORCH_CHECK(s >= 1 && s <= h && s <= w, "s must be in [1, min(h, w)] = [1, ", std::min(h, w), "], got ", s);
  const int64_t* ph = vh.data_ptr<int64_t>();
  const int64_t* pw = vw.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(ph[i] >= 0 && ph[i] <= h - s && pw[i] >= 0 && pw[i] <= w - s, "window corner (", ph[i], ", ", pw[i],
                ") of point ", i, " does not fit an s=", s, " window in ", h, "x", w);
  }
  Tensor out = xb.clone();
  if (k == 0 || c == 0) return out;
  const int64_t plane = h * w, point = c * plane;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "square_propose_cpu", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pb = xb.data_ptr<scalar_t>();
    const scalar_t* pe = eps.data_ptr<scalar_t>();
    const scalar_t* pg = signs.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, k, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r0 = ph[i], c0 = pw[i];
        // writes channel ch's window with sign sg; returns whether any value differs from x_best
        auto write = [&](int64_t ch, scalar_t sg) {
          const scalar_t step = static_cast<scalar_t>(pe[i] * sg);
          const int64_t base = i * point + ch * plane;
          bool changed = false;
          for (int64_t r = r0; r < r0 + s; ++r) {
            const int64_t row = base + r * w;
            for (int64_t q = c0; q < c0 + s; ++q) {
              const scalar_t v = clamp01(static_cast<scalar_t>(px[row + q] + step));
              po[row + q] = v;
              changed |= !(v == pb[row + q]);
            }
          }
          return changed;
        };
        bool changed = false;
        for (int64_t ch = 0; ch < c; ++ch) changed |= write(ch, pg[i * c + ch]);
        if (!changed) write(0, static_cast<scalar_t>(-pg[i * c]));
      }
    });
  });
  return out;
}

Tensor square_accept_cpu_(Tensor& xb, Tensor& mb, const Tensor& x_new, const Tensor& logits, const Tensor& y) {
  check_cpu(xb, "x_best");
  check_cpu(mb, "margin_best");
  check_cpu(x_new, "x_new");
  check_cpu(logits, "logits");
  check_cpu(y, "y");
  const int64_t k = xb.size(0);
  TORCH_CHECK(x_new.sizes() == xb.sizes() && x_new.scalar_type() == xb.scalar_type(),
              "x_new must have x_best's shape and dtype");
  TORCH_CHECK(mb.scalar_type() == at::kFloat && mb.dim() == 1 && mb.size(0) == k, "margin_best must be float32 (",
              k, ",)");
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == k, "logits must be (k, C) with k = ", k, ", got ",
              logits.sizes());
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == k, "y must be int64 (", k, ",)");
  const int64_t C = logits.size(1);
  const int64_t* py = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(py[i] >= 0 && py[i] < C, "y[", i, "] = ", py[i], " is not a class in [0, ", C, ")");
  }
  float* pm = mb.data_ptr<float>();
  const int64_t point = k > 0 ? xb.numel() / k : 0;
  int64_t broken = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "square_accept_margin", [&] {
    const scalar_t* pz = logits.data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xb.scalar_type(), "square_accept_copy", [&] {
      using x_t = scalar_t;
      x_t* pb = xb.data_ptr<x_t>();
      const x_t* pn = x_new.data_ptr<x_t>();
      for (int64_t i = 0; i < k; ++i) {
        const auto* z = pz + i * C;
        float other = -std::numeric_limits<float>::infinity();
        bool nan = false;
        for (int64_t j = 0; j < C; ++j) {
          if (j == py[i]) continue;
          const float v = static_cast<float>(z[j]);
          if (std::isnan(v)) nan = true;
          else if (v > other) other = v;
        }
        const float zy = static_cast<float>(z[py[i]]);
        const float m = nan ? std::numeric_limits<float>::quiet_NaN() : zy - other;
        if (m < pm[i]) {
          pm[i] = m;
          std::memcpy(pb + i * point, pn + i * point, sizeof(x_t) * point);
        }
        broken += pm[i] <= 0.0f;
      }
    });
  });
  return at::scalar_tensor(broken, xb.options().dtype(at::kLong));
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::tuple<Tensor, Tensor> square_draws_cpu(const Tensor& keys, int64_t counter, at::IntArrayRef bounds,
                                            int64_t n_signs, at::ScalarType dtype) {
  check_cpu(keys, "keys");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 1, "keys must be a 1-D int64 tensor, got ",
              keys.scalar_type(), " of shape ", keys.sizes());
  TORCH_CHECK(counter >= 0, "counter must be >= 0, got ", counter);
  TORCH_CHECK(n_signs >= 0, "n_signs must be >= 0, got ", n_signs);
  for (const int64_t b : bounds) TORCH_CHECK(b >= 1, "every bound must be >= 1, got ", b);
  const int64_t k = keys.size(0), nb = static_cast<int64_t>(bounds.size());
  Tensor ints = at::empty({nb, k}, keys.options());
  Tensor sg = at::empty({k, n_signs}, keys.options().dtype(dtype));
  const int64_t* pk = keys.data_ptr<int64_t>();
  int64_t* pi = ints.data_ptr<int64_t>();
  std::vector<uint64_t> bnd(bounds.begin(), bounds.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "square_draws_cpu", [&] {
    scalar_t* ps = sg.data_ptr<scalar_t>();
    const uint64_t first = static_cast<uint64_t>(counter) * static_cast<uint64_t>(nb + n_signs) + 1;
    for (int64_t i = 0; i < k; ++i) {
      const uint64_t key = static_cast<uint64_t>(pk[i]);
      auto draw = [&](int64_t j) { return mix64(key + (first + static_cast<uint64_t>(j)) * kGolden); };
      for (int64_t j = 0; j < nb; ++j) pi[j * k + i] = static_cast<int64_t>((draw(j) >> 1) % bnd[j]);
      for (int64_t m = 0; m < n_signs; ++m) ps[i * n_signs + m] = static_cast<scalar_t>((draw(nb + m) >> 63) ? -1 : 1);
    }
  });
  return {ints, sg};
}

}  // namespace
}  // namespace sq
}  // namespace drp

TORCH_LIBRARY_FRAGMENT(drp, m) {
  m.def(
      "square_propose_cpu(Tensor x, Tensor x_best, Tensor eps, Tensor vh, Tensor vw, int s, Tensor signs) -> "
      "Tensor");
  m.def(
      "square_accept_cpu_(Tensor(a!) x_best, Tensor(b!) margin_best, Tensor x_new, Tensor logits, Tensor y) -> "
      "Tensor");
  m.def("square_draws_cpu(Tensor keys, int counter, int[] bounds, int n_signs, ScalarType dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(drp, CPU, m) {
  m.impl("square_propose_cpu", &drp::sq::square_propose_cpu);
  m.impl("square_accept_cpu_", &drp::sq::square_accept_cpu_);
  m.impl("square_draws_cpu", &drp::sq::square_draws_cpu);
}
