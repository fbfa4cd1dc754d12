"""Build script.

Default (``pip install .``): the pure-Python package, plus a copy of csrc/ inside it
(``gatedlora/_csrc``) so that the cuda backend can build its extension on first use. Needs no torch,
no CUDA and no pybind11, so build isolation works on any machine.

Ahead of time (``GATEDLORA_BUILD_CUDA=1``): where ``nvcc`` is found, also compiles the CUDA
extension ``gatedlora._cuda_kernels`` for ``GATEDLORA_CUDA_ARCHS`` (default ``80;90``). That needs
pybind11 in the build environment, which build isolation does not have:

    pip install pybind11 ninja            # (the cuda extra)
    GATEDLORA_BUILD_CUDA=1 pip install --no-build-isolation .

Without nvcc it says so and installs the pure-Python package.
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _cuda_build():
    """gatedlora/ops/cuda_build.py loaded by path: it imports neither torch nor gatedlora."""
    spec = importlib.util.spec_from_file_location("_gatedlora_cuda_build", ROOT / "gatedlora" / "ops" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Ship csrc/ as gatedlora/_csrc so that an installed package can build the extension on first use."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "gatedlora" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("gated_lora.h", "gated_lora_kernels.cu", "bindings.cpp"):
            if (CSRC / name).is_file():
                shutil.copy2(CSRC / name, target / name)


class BuildCudaExtension(build_ext):
    """Compiles the extension with the same commands as the on-first-use build (cuda_build.build_module)."""

    def build_extension(self, ext):
        cuda_build = _cuda_build()
        output = Path(self.get_ext_fullpath(ext.name))
        built, _ = cuda_build.build_module(Path(self.build_temp) / "gatedlora_cuda", cuda_build.cuda_archs(),
                                           output_name=output.name)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, output)


def _extensions():
    if os.environ.get("GATEDLORA_BUILD_CUDA", "") != "1":
        return [], {}
    cuda_build = _cuda_build()
    if cuda_build.find_nvcc() is None:
        print("gatedlora: GATEDLORA_BUILD_CUDA=1 but nvcc was not found; installing without the prebuilt CUDA "
              "extension (the cuda backend will report itself unavailable)", file=sys.stderr)
        return [], {}
    try:
        cuda_build.pybind11_include()
    except cuda_build.CudaExtensionUnavailable as exc:
        sys.exit(f"gatedlora: GATEDLORA_BUILD_CUDA=1 needs pybind11 at build time: {exc}; then run "
                 "GATEDLORA_BUILD_CUDA=1 pip install --no-build-isolation .")
    sources = [str(p.relative_to(ROOT)) for p in (CSRC / "bindings.cpp", CSRC / "gated_lora_kernels.cu")]
    return [Extension("gatedlora._cuda_kernels", sources=sources)], {"build_ext": BuildCudaExtension}


ext_modules, ext_commands = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **ext_commands})
