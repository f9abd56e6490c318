"""Builds the Cython ring.  AIOCOLOC_NO_EXTENSIONS=1 skips the build."""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("AIOCOLOC_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                f"aiocoloc.{name}",
                [f"aiocoloc/{name}.pyx"],
                include_dirs=["aiocoloc"],
                extra_compile_args=["-O2", "-std=c11"],
            )
            for name in ("_ring", "_atomic")
        ],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
