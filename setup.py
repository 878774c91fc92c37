"""Builds actnn_mm and its codec extension ``actnn_mm._C``.

The CPU kernels are always built. The CUDA kernels are added when a GPU is visible or
``FORCE_CUDA=1`` (e.g. to compile and link them on a machine without a GPU); ``CUDA_HOME`` must then
name the toolkit folder. Both use the same header math, compiled without floating-point
contraction so every backend rounds like the pure-PyTorch reference.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch


def codec_extension():
    sources = ['csrc/actnn.cpp'] + sorted(glob.glob('csrc/cpu/*.cpp'))
    cxx = ['-O3', '-std=c++20', '-ffp-contract=off', '-fopenmp']
    with_cuda = torch.cuda.is_available() or os.getenv('FORCE_CUDA', '0') == '1'
    if not with_cuda:
        return CppExtension('actnn_mm._C', sources, extra_compile_args={'cxx': cxx},
                            extra_link_args=['-fopenmp'])
    return CUDAExtension(
        'actnn_mm._C', sources + sorted(glob.glob('csrc/cuda/*.cu')),
        define_macros=[('WITH_CUDA', None)],
        extra_compile_args={'cxx': cxx, 'nvcc': ['-O3', '-std=c++20', '--fmad=false']},
        extra_link_args=['-fopenmp'])


setup(
    name='actnn_mm',
    version='0.1.0',
    description='Activation-compressed training (ActNN) for PyTorch and OpenMMLab 2.0',
    packages=find_packages(include=['actnn_mm', 'actnn_mm.*']),
    python_requires='>=3.9',
    ext_modules=[codec_extension()],
    cmdclass={'build_ext': BuildExtension},
)
