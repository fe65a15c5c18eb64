"""CUDA C++ sources of the edge runtime's kernels, shipped as package data.

pyproject maps this folder to ``segfast.edge.csrc`` (like ``kernels/`` → ``segfast.kernels``)
so the .cu files travel with the package: ``segfast.edge`` compiles them with NVRTC at load
time. ``make -C csrc`` builds the same sources into cubins with nvcc (see the Makefile).
"""
