"""Build script. Today the package is pure Python, so ``pip install .`` needs no torch and no
CUDA (build isolation works). The cuda backend (csrc/) adds its extension here, built only
where ``nvcc`` and a CUDA build of torch are present, and on first use otherwise.
"""
from setuptools import setup

setup()
