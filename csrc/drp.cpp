// drp_kernels.ops._C: the one place that defines the `drp` op library and the Python module.
//
// Every op file registers its own schemas with TORCH_LIBRARY_FRAGMENT(drp, m) and its kernels with
// TORCH_LIBRARY_IMPL(drp, CPU|CUDA, m), next to their code:
//   pgd_step.cpp  pgd_step_, ball_init (CPU; CUDA kernels in pgd_step_cuda.cu behind DRP_WITH_CUDA)
//   lp_dist.cpp   lp_dist_cpu_forward, lp_dist_cpu_backward
//   square.cpp    square_propose_cpu, square_accept_cpu_, square_draws_cpu
// Importing the module (drp_kernels/ops/_extension.py does, once) runs those registrations; its
// only attribute, with_cuda, says whether the CUDA kernels were compiled in.
#include <torch/extension.h>

TORCH_LIBRARY(drp, m) {
  // The schemas live in the op files' fragments.
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef DRP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
