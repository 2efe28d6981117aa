"""Build script for the optional CUDA C++ extension (lopfast._C).

A plain ``pip install .`` is pure Python. The extension is built only when asked:

    LOPFAST_BUILD_CUDA=1 pip install --no-build-isolation .

(``--no-build-isolation`` so it compiles against the torch that is already installed.)
``LOPFAST_CUDA_ARCH`` picks the architectures (default "90" for Hopper), ``MAX_JOBS``
is respected by torch's build helper.
"""
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}

if os.environ.get("LOPFAST_BUILD_CUDA", "0") == "1":
    import runpy

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    # the one set of flags the JIT build (lopfast/ops/cuda_ext.py) uses too; read by path, since
    # importing lopfast would import all of it
    flags = runpy.run_path(os.path.join(here, "lopfast", "_build_flags.py"))
    gencode = flags["gencode_flags"](os.environ.get("LOPFAST_CUDA_ARCH", flags["DEFAULT_ARCHS"]))
    sources = sorted(
        os.path.join("csrc", f)
        for f in os.listdir(os.path.join(here, "csrc"))
        if f.endswith((".cu", ".cpp"))
    )
    ext_modules.append(
        CUDAExtension(
            name="lopfast._C",
            sources=sources,
            extra_compile_args={"cxx": list(flags["CXX_FLAGS"]), "nvcc": flags["NVCC_FLAGS"] + gencode},
        )
    )
    cmdclass["build_ext"] = BuildExtension

# kernels/ sits at the top level (the design card's layout) and is installed as lopfast.kernels.
packages = find_packages(include=["lopfast", "lopfast.*"]) + ["lopfast.kernels"]

setup(packages=packages, ext_modules=ext_modules, cmdclass=cmdclass)
