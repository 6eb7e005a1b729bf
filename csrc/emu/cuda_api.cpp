// The emulated device behind the CUDA runtime calls of the kernels' host code: an sm_90 part with
// H100's shared-memory limits; its SM count is 132 unless CROSSHEAD_CUDA_EMULATOR_SMS says otherwise
// (small counts make small inputs exercise the multi-tile split paths). Dynamic shared memory above
// 48 KiB must be enabled per kernel with cudaFuncSetAttribute, as on a GPU; the launch checks it.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "emu/cuda_runtime.h"
#include "emu/internal.h"

namespace {

std::mutex g_attr_mutex;
std::map<const void*, size_t> g_max_dynamic_smem;  // per kernel, as raised by cudaFuncSetAttribute

int sm_count() {
  const char* s = std::getenv("CROSSHEAD_CUDA_EMULATOR_SMS");
  const int n = s ? std::atoi(s) : 0;
  return n > 0 ? n : 132;
}

}  // namespace

namespace crosshead_emu {

size_t func_max_dynamic_smem(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  const auto it = g_max_dynamic_smem.find(kernel);
  return it == g_max_dynamic_smem.end() ? 48 * 1024 : it->second;
}

}  // namespace crosshead_emu

const cudaDeviceProp* crosshead_emu_device_properties() {
  static cudaDeviceProp prop;
  std::snprintf(prop.name, sizeof prop.name, "crosshead CUDA emulator (sm_90)");
  prop.major = 9;
  prop.minor = 0;
  prop.multiProcessorCount = sm_count();
  prop.sharedMemPerBlock = 48 * 1024;
  prop.sharedMemPerBlockOptin = crosshead_emu::kDynamicSmemMax;
  prop.sharedMemPerMultiprocessor = 228 * 1024;
  prop.maxThreadsPerBlock = 1024;
  prop.maxThreadsPerMultiProcessor = 2048;
  prop.warpSize = 32;
  prop.regsPerMultiprocessor = 65536;
  return &prop;
}

cudaError_t crosshead_emu_func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > crosshead_emu::kDynamicSmemMax)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  g_max_dynamic_smem[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}

// Occupancy from threads and shared memory only (1 KiB reserved per block, as on sm_90); the
// emulator knows nothing of register use, which a GPU also counts.
cudaError_t crosshead_emu_occupancy(int* blocks, const void*, int block_size, size_t dynamic_smem) {
  if (!blocks || block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  const cudaDeviceProp& p = *crosshead_emu_device_properties();
  const size_t per_block = dynamic_smem + 1024;
  int by_threads = p.maxThreadsPerMultiProcessor / block_size;
  int by_smem = static_cast<int>(p.sharedMemPerMultiprocessor / per_block);
  *blocks = std::min(std::min(by_threads, by_smem), 32);
  return cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}
