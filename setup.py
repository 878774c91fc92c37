"""Builds actnn_mm and its codec extension ``actnn_mm._C``.

The CPU kernels are always built. The CUDA kernels are added when a GPU is visible or
``FORCE_CUDA=1`` (e.g. to compile and link them on a machine without a GPU); ``CUDA_HOME`` must then
name the toolkit folder. They are compiled for the archs in ``TORCH_CUDA_ARCH_LIST`` if set, else
for those of the visible GPUs only. Both use the same header math, compiled without floating-point
contraction so every backend rounds like the pure-PyTorch reference.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch


def cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else the compute capabilities of the visible GPUs."""
    archs = os.getenv('TORCH_CUDA_ARCH_LIST') or ';'.join(
        '%d.%d' % capability for capability in sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    if not archs:
        raise SystemExit('actnn_mm: FORCE_CUDA=1 without a visible GPU: set TORCH_CUDA_ARCH_LIST '
                         'to the GPU archs to compile the CUDA kernels for, e.g. "8.0;9.0"')
    return archs


def codec_extension():
    sources = ['csrc/actnn.cpp'] + sorted(glob.glob('csrc/cpu/*.cpp'))
    cxx = ['-O3', '-std=c++20', '-ffp-contract=off', '-fopenmp']
    with_cuda = torch.cuda.is_available() or os.getenv('FORCE_CUDA', '0') == '1'
    if not with_cuda:
        return CppExtension('actnn_mm._C', sources, extra_compile_args={'cxx': cxx},
                            extra_link_args=['-fopenmp'])
    os.environ['TORCH_CUDA_ARCH_LIST'] = cuda_arch_list()  # read by torch's BuildExtension
    print(f'actnn_mm: compiling the CUDA kernels for TORCH_CUDA_ARCH_LIST='
          f'{os.environ["TORCH_CUDA_ARCH_LIST"]}')
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
