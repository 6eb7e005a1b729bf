// Loads the crosshead operator library into a C++ program and checks every op is registered with
// the dispatcher. Usage: crosshead_schema_check path/to/libcrosshead_ops.so
#include <dlfcn.h>
#include <iostream>

#include <ATen/core/dispatch/Dispatcher.h>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " libcrosshead_ops.so\n";
    return 2;
  }
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << "dlopen failed: " << dlerror() << "\n";
    return 1;
  }
  int missing = 0;
  for (const char* op : {"crosshead::landmarks", "crosshead::landmarks_backward", "crosshead::imhsa",
                         "crosshead::imhsa_backward"}) {
    auto handle = c10::Dispatcher::singleton().findSchema({op, ""});
    if (!handle) {
      std::cerr << "missing: " << op << "\n";
      ++missing;
    } else {
      std::cout << handle->schema() << "\n";
    }
  }
  return missing ? 1 : 0;
}
