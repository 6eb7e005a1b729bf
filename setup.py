"""Builds crosshead._C_<tag> from csrc/: the op schemas always, the CUDA kernels when a CUDA toolchain
and a CUDA build of torch are present (or FORCE_CUDA=1). Every decision is printed.

The tag names the torch the library is built against (crosshead/_toolchain.py: torch_tag, e.g.
_C_torch2_13_0_cpu), and the loader imports the library of the running torch; so environments with
different torch builds that install the same checkout in place (tools/venv.sh cpu / cuda) each keep
their own library, and their intermediate files go to build/<tag>.

Environment:
  FORCE_CUDA=1                 build the CUDA sources even if the checks below fail
  CROSSHEAD_SKIP_CUDA_BUILD=1  never build the CUDA sources
  CROSSHEAD_SKIP_BUILD=1       build no extension at all (pure-torch install)
  TORCH_CUDA_ARCH_LIST         target GPUs; default "8.0;9.0" (A100, H100/H200)
  DEBUG=1                      -O0 -g
  MAX_JOBS                     parallel compile jobs (ninja)
  CROSSHEAD_NVCC_FLAGS         extra nvcc flags, split on spaces (e.g. "-Xptxas -v" for the resource report)
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def say(msg):
    print(f"[crosshead setup] {msg}", flush=True)


def extensions():
    if os.environ.get("CROSSHEAD_SKIP_BUILD") == "1":
        say("CROSSHEAD_SKIP_BUILD=1: no compiled library; the ops will be served by the pure-torch path")
        return [], {}, {}
    spec = importlib.util.spec_from_file_location("_toolchain", ROOT / "crosshead" / "_toolchain.py")
    toolchain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toolchain)
    toolchain.export_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    built_for = (torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None))
    name = "crosshead." + toolchain.library_name(*built_for)  # the loader computes the same name
    # each torch build its own build directory: no intermediate files shared, no stale library of
    # another torch in a wheel
    options = {"build": {"build_base": str(Path("build") / toolchain.torch_tag(*built_for))}}
    say(f"building {name} for {toolchain.describe_torch(*built_for)}")

    debug = os.environ.get("DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]  # no -std: torch picks the standard its headers need
    cxx.append(toolchain.built_for_flag(toolchain.describe_torch(*built_for)))
    sources = [str(p.relative_to(ROOT)) for p in (CSRC / "crosshead.cpp", CSRC / "python_module.cpp")]

    if os.environ.get("CROSSHEAD_SKIP_CUDA_BUILD") == "1":
        use_cuda, why = False, "CROSSHEAD_SKIP_CUDA_BUILD=1"
    elif os.environ.get("FORCE_CUDA") == "1":
        use_cuda, why = True, "FORCE_CUDA=1"
    elif not torch.version.cuda:
        use_cuda, why = False, f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        use_cuda, why = False, "no CUDA toolchain found (CUDA_HOME / nvcc)"
    else:
        use_cuda, why = True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolchain at {CUDA_HOME}"
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
    if use_cuda and not cuda_sources:
        use_cuda, why = False, "no CUDA sources in csrc/cuda"
    say(f"torch {torch.__version__}; CUDA kernels {'ON' if use_cuda else 'OFF'}: {why}")

    class CheckedBuildExtension(BuildExtension):
        """Refuses a library that carries its own C++ runtime (toolchain.cxx_runtime_problem)."""

        def build_extension(self, ext):
            super().build_extension(ext)
            problem = toolchain.cxx_runtime_problem(self.get_ext_fullpath(ext.name))
            if problem:
                raise RuntimeError(f"[crosshead setup] {problem}")

    include_dirs = [str(CSRC)]
    if not use_cuda:
        ext = CppExtension(name, sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})
        return [ext], {"build_ext": CheckedBuildExtension}, options

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    say(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    # CUDA wheels of torch ship headers (e.g. cusparse.h) that a local toolkit may lack.
    for wheel_headers in (Path(torch.__file__).parent.parent / "nvidia").glob("cu*/include"):
        include_dirs.append(str(wheel_headers))
        say(f"adding CUDA headers from the torch wheel: {wheel_headers}")
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math", "-lineinfo"]
    nvcc += ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    nvcc += os.environ.get("CROSSHEAD_NVCC_FLAGS", "").split()
    ext = CUDAExtension(name, sources + cuda_sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], {"build_ext": CheckedBuildExtension}, options


ext_modules, cmdclass, options = extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
