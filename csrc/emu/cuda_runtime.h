// The part of the CUDA runtime API the kernels' host code uses, for the SIMT emulator: an emulated
// device (an H100-like sm_90 part; CROSSHEAD_CUDA_EMULATOR_SMS sets its SM count), kernel
// attributes and occupancy. Implemented in cuda_api.cpp.
#pragma once

#include <cstddef>

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct CUstream_st*;

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor;
  int maxThreadsPerBlock, maxThreadsPerMultiProcessor, warpSize, regsPerMultiprocessor;
};

const cudaDeviceProp* crosshead_emu_device_properties();
cudaError_t crosshead_emu_func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t crosshead_emu_occupancy(int* blocks, const void* kernel, int block_size, size_t dynamic_smem);
const char* cudaGetErrorString(cudaError_t error);

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  return crosshead_emu_func_set_attribute(kernel, attr, value);
}
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return crosshead_emu_func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P...), int block_size,
                                                                 size_t dynamic_smem) {
  return crosshead_emu_occupancy(blocks, reinterpret_cast<const void*>(kernel), block_size, dynamic_smem);
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
