// PROVISIONAL placeholder: the batched PGD step lands with issue 2.
#include <torch/extension.h>
TORCH_LIBRARY(drp, m) {}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
