"""Builds the Cython ring (``_ring.pyx`` and the ``_ring_*.pxi`` files it includes: one
extension, so hot-path calls stay inline) and the pool's atomics.
AIOCOLOC_NO_EXTENSIONS=1 skips the build."""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("AIOCOLOC_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                name,
                [name.replace(".", "/") + ".pyx"],
                include_dirs=["aiocoloc"],  # for includes/atomics.h
                extra_compile_args=["-O2", "-std=c11"],
            )
            for name in ("aiocoloc._ring", "aiocoloc.shm._atomic")
        ],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
