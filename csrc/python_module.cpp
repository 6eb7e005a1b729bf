// Makes the library importable as crosshead._C (setup.py builds only; the CMake build for libtorch
// users leaves it out). Importing runs the TORCH_LIBRARY initializers; no Python API is exposed.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
