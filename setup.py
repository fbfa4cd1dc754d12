"""Build script. The package is pure Python; a CUDA extension from csrc/ is added only where
``nvcc`` is on the PATH and csrc/ holds kernel sources, so ``pip install .`` on a machine
without CUDA (or under build isolation, which needs no torch) installs the Python package alone.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup


def cuda_extensions():
    sources = sorted(str(p) for p in Path("csrc").glob("*.cu"))
    if not sources or shutil.which("nvcc") is None or os.environ.get("GATEDLORA_BUILD_CUDA") == "0":
        return []
    from csrc_build import cuda_extension  # noqa: E402  (added with the cuda backend)

    return [cuda_extension(sources)]


setup(ext_modules=cuda_extensions())
