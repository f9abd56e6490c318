"""Builds the Cython ring (``_ring.pyx`` and the ``_ring_*.pxi`` files it includes: one
extension, so hot-path calls stay inline), the pool's atomics, and the hot halves
written in Cython's pure-Python mode, each a ``.py`` compiled with the ``.pxd``
beside it: the transport's data path, the spin policy and the hub's waking
(``aiocoloc.compiled``).  AIOCOLOC_NO_EXTENSIONS=1 skips the build."""

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
                ("aiocoloc.notify.spin_policy", ".py"),
                ("aiocoloc.notify.waking", ".py"),
            )
        ],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
