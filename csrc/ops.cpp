// Operator schemas of the ctpo_megatron extension. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL), so CPU/CUDA dispatch, opcheck and
// torch.compile go through the torch dispatcher rather than Python branches.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// Importing ctpo_megatron._C loads this library and thereby registers the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ctpo {
// Names the backends compiled into this build; `python -m ctpo_megatron.ops` reports it.
std::string build_info() {
#ifdef CTPO_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}
}  // namespace ctpo

TORCH_LIBRARY(ctpo_megatron, m) {
  m.def("build_info() -> str", &ctpo::build_info);
}
