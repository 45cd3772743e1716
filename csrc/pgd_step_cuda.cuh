// Launchers of the CUDA kernels of the batched PGD step. No torch headers: the
// C++ binding (pgd_step.cpp) validates the tensors and hands over raw pointers,
// sizes and the current cudaStream_t.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace drp {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// Sample b of every tensor is the dense block of elements [b*D, (b+1)*D)
// (any fixed permutation inside a sample, shared by all tensors, is fine).
struct StepParams {
  void* out;                // x_adv: read, then written in place
  const void* x;
  const void* grad;
  int64_t batch;            // B
  int64_t per_sample;       // D
  double eps, alpha;        // used where the per-sample pointers are null
  const void* eps_ps;       // length B in the compute dtype (double for kDouble, else float), or null
  const void* alpha_ps;     // same, or null
  const bool* active;       // length B, or null
  double lower, upper;
};

struct InitParams {
  void* out;
  const void* x;
  const float* noise;       // linf: U[0,1) per element; l2: N(0,1) per element (float32)
  const float* radius_u;    // l2 only: U[0,1) per sample (float32)
  int64_t batch, per_sample;
  double eps;
  const void* eps_ps;       // length B in the compute dtype, or null
  double lower, upper;
};

// Bytes of scratch memory pgd_step_l2 needs (0 when one block per sample is used).
size_t l2_scratch_bytes(DType dtype, int64_t batch, int64_t per_sample);

cudaError_t pgd_step_linf(DType dtype, const StepParams& p, cudaStream_t stream);
cudaError_t pgd_step_l2(DType dtype, const StepParams& p, void* scratch, cudaStream_t stream);
cudaError_t ball_init_linf(DType dtype, const InitParams& p, cudaStream_t stream);
cudaError_t ball_init_l2(DType dtype, const InitParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace drp
