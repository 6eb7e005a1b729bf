// SIMT emulator stand-in for torch's c10/cuda/CUDAException.h (see csrc/emu/device.h). Launch
// errors are thrown by the emulated launch itself, so the launch check has nothing to do.
#pragma once

#include <c10/util/Exception.h>

#include "emu/cuda_runtime.h"

#define C10_CUDA_CHECK(expr)                                                                    \
  do {                                                                                          \
    const cudaError_t crosshead_emu_err = (expr);                                               \
    TORCH_CHECK(crosshead_emu_err == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(crosshead_emu_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
