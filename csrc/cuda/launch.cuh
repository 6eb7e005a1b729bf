// The one launch helper of the kernels: a plain <<<grid, block, smem, stream>>> launch under nvcc,
// the SIMT emulator's runtime when the sources are compiled for the CPU (csrc/emu, CROSSHEAD_EMULATOR).
//   launch_kernel<my_kernel<T>>(grid, block, smem_bytes, stream, args...);
#pragma once

#include <cstddef>

namespace crosshead {

template <auto Kernel, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
#ifdef CROSSHEAD_EMULATOR
  (void)stream;
  ::crosshead_emu::launch_kernel<Kernel>(grid, block, smem, args...);
#else
  Kernel<<<grid, block, smem, stream>>>(args...);
#endif
}

}  // namespace crosshead
