"""Build of the pybind11 extension `rftengine._C` (host-side hot paths, g++ only).

Everything declarative lives in pyproject.toml; this file exists for what setuptools
cannot express there: the C++ extension and the mapping of the top-level `kernels/`
and `bench/` folders into the package (`rftengine.kernels`, `rftengine.bench`), so
that no top-level `kernels` module ever shadows the Hugging Face package of that name.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "rftengine._C",
        sources=["csrc/packing.cpp", "csrc/module.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    packages=[
        "rftengine",
        "rftengine.ops",
        "rftengine.generation",
        "rftengine.methods",
        "rftengine.kernels",
        "rftengine.bench",
    ],
    package_dir={"rftengine.kernels": "kernels", "rftengine.bench": "bench"},
    package_data={"rftengine": ["data/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
