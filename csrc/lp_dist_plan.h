// The plan of one drp::lp_dist_cpu_* call: which scheme computes it and with which powers. Shared by
// lp_dist.cpp and the micro-kernels it includes once per instruction set (lp_dist_kernels.h).
#pragma once

#include <cstdint>

namespace drp {
namespace lpd {

// Power modes of the micro-kernels (an exponent >= 1 is a compile-time integer exponent).
enum PowMode { kPowInt = -1, kPowReal = -2 };

// How the forward computes a call (make_plan).
enum Kind { kInf = 0, kOne = 1, kSingle = 2, kTwoPass = 3 };
// The forward's power of p: fixed 2 or 8, a run-time integer (even: no abs needed), or real.
enum FwdPow { kFwd2 = 0, kFwd8 = 1, kFwdIntEven = 2, kFwdIntOdd = 3, kFwdReal = 4 };
// The backward's power of p - 1.
enum BwdPow { kBwdSign = 0, kBwd1 = 1, kBwd7 = 2, kBwdIntOdd = 3, kBwdIntEven = 4, kBwdReal = 5 };

struct Plan {
  double p;
  int kind;
  int fwd_pow, bwd_pow;
  unsigned e;      // p as an integer (integer p only)
  double scale;    // S: the copies hold x / S and w / S, out = S * their distance
  bool stats;      // the forward saves idx (p = inf) or inv / r (finite p > 1)
  bool sparse;     // large p: only the terms above thr * max, in double (lp_dist_kernels.h)
  bool integer;    // p is an integer <= 1e6
  double thr;      // 2^(-40 / (p - 1)): the sparse scheme's threshold relative to the pair's max
  bool dense_ok;   // the sparse scheme may run a tile densely in float (accurate enough up to kDenseMaxP)
};

// Coordinates per chunk of the sparse scheme's chunk maxima (lp_dist_kernels.h, fwd_max_chunks).
constexpr int kSparseChunk = 8;

// Pairs whose pre-scaled sum is below this are redone with two passes.
constexpr double kSingleMinSum = 0x1p-60;

}  // namespace lpd
}  // namespace drp
