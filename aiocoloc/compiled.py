"""Modules compiled from their own Python source, or that source.

The hot halves of the transport (``transport.data_path``) and of waking
(``notify.spin_policy``, ``notify.hub_bell``) are written in Cython's
pure-Python mode: one ``.py`` file, a ``.pxd`` beside it that types it, and
``setup.py`` compiles the pair.  The interpreted source is the reference
that ``AIOCOLOC_NO_EXTENSIONS=1`` runs, even with the compiled module built
beside it; ``load`` picks one, once per process, so that every importer gets
the same classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

from aiocoloc.ring import extensions_disabled

__all__ = ["load"]

_log = logging.getLogger("aiocoloc.compiled")


def load(name: str) -> ModuleType:
    """Module ``name`` (its ``COMPILED`` says which it is): compiled, or its
    ``.py`` source when ``AIOCOLOC_NO_EXTENSIONS`` asks for it or when the
    extension was not built (with a warning, as the source is slower)."""
    if not extensions_disabled():
        module = importlib.import_module(name)
        if not module.COMPILED:
            _log.warning("%s is not compiled; its slower reference runs", name)
        return module
    loaded = sys.modules.get(name)
    if loaded is not None and not loaded.COMPILED:
        return loaded
    package, _, leaf = name.rpartition(".")
    directory = Path(importlib.import_module(package).__file__ or "").parent
    spec = importlib.util.spec_from_file_location(name, directory / f"{leaf}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
