"""Builds the Cython ring (``_ring.pyx`` and the ``_ring_*.pxi`` files it includes: one
extension, so hot-path calls stay inline), the pool's atomics, and the transport's
data path (``transport/data_path.py``, compiled in Cython's pure-Python mode with the
``.pxd`` beside it).  AIOCOLOC_NO_EXTENSIONS=1 skips the build."""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("AIOCOLOC_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                name,
                [name.replace(".", "/") + suffix],
                include_dirs=["aiocoloc"],  # for includes/atomics.h
                extra_compile_args=["-O2", "-std=c11"],
            )
            for name, suffix in (
                ("aiocoloc._ring", ".pyx"),
                ("aiocoloc.shm._atomic", ".pyx"),
                ("aiocoloc.transport.data_path", ".py"),
            )
        ],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
