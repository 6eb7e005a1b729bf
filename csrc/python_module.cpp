// Makes the library importable as crosshead._C_<tag>, the tag naming the torch it was built against
// (crosshead/_toolchain.py; setup.py builds only, the CMake build for libtorch users leaves this file
// out). Importing runs the TORCH_LIBRARY initializers; no Python API is exposed.
#include <Python.h>

// torch's BuildExtension defines TORCH_EXTENSION_NAME as the last part of the extension's name.
#ifndef TORCH_EXTENSION_NAME
#error "TORCH_EXTENSION_NAME (the module name, _C_<torch tag>) must be defined: build with setup.py"
#endif
#define CROSSHEAD_CAT_(a, b) a##b
#define CROSSHEAD_CAT(a, b) CROSSHEAD_CAT_(a, b)
#define CROSSHEAD_STR_(a) #a
#define CROSSHEAD_STR(a) CROSSHEAD_STR_(a)

#ifdef CROSSHEAD_BUILT_FOR
// "crosshead-built-for: torch <version> (<toolkit>), Python <x.y>" as byte values (setup.py), kept in
// the file so the loader can tell which torch this library is for without loading it.
extern "C" __attribute__((used, visibility("default"))) const char crosshead_built_for[] = {
    CROSSHEAD_BUILT_FOR, 0};
#endif

PyMODINIT_FUNC CROSSHEAD_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, CROSSHEAD_STR(TORCH_EXTENSION_NAME),
                                          nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
