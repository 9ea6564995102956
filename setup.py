"""The C extension of the 1-bit kernel (dynaslice/binary/csrc/bitconv.c); everything else is in pyproject.toml.

It needs only Python's headers (no torch, no numpy at build time), so ``pip install -e .`` builds
it anywhere a C compiler is, and the binary runner works without torch. The vector paths are
compiled per function (``target`` attributes) and chosen at run time, so the default flags suffice.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dynaslice.binary._bitconv",
            sources=["dynaslice/binary/csrc/bitconv.c"],
            extra_compile_args=["-O3", "-std=c11"],
        )
    ]
)
