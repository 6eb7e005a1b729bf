// SIMT emulator stand-in for torch's ATen/cuda/CUDAContext.h (see csrc/emu/device.h).
#pragma once

#include "emu/cuda_runtime.h"

namespace at::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
inline const cudaDeviceProp* getCurrentDeviceProperties() { return crosshead_emu_device_properties(); }

}  // namespace at::cuda
