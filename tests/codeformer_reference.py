"""CodeFormer's own architecture (sczhou/CodeFormer, as packaged by codeformer-pip), loaded
alone as the tests' reference for the service's CodeFormer.

The package vendors a whole basicsr whose __init__ imports training code (datasets, losses,
lpips); only `codeformer_arch.py` and `vqgan_arch.py` are wanted. They import a logger and a
registry from that basicsr, so those two names are stood in for while the files load, and the
stand-ins are taken out of sys.modules afterwards.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path


class _Registry:
    def register(self, obj=None):
        return obj if obj is not None else (lambda cls: cls)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def original_codeformer():
    """The CodeFormer class of the original code."""
    archs = Path(importlib.util.find_spec("codeformer").submodule_search_locations[0]) / "basicsr" / "archs"
    utils = types.ModuleType("codeformer.basicsr.utils")
    utils.get_root_logger = lambda *args, **kwargs: logging.getLogger("codeformer-reference")
    registry = types.ModuleType("codeformer.basicsr.utils.registry")
    registry.ARCH_REGISTRY = _Registry()
    stand_ins = {"codeformer.basicsr": types.ModuleType("codeformer.basicsr"),
                 "codeformer.basicsr.archs": types.ModuleType("codeformer.basicsr.archs"),
                 "codeformer.basicsr.utils": utils, "codeformer.basicsr.utils.registry": registry}
    names = list(stand_ins) + ["codeformer.basicsr.archs.vqgan_arch", "codeformer.basicsr.archs.codeformer_arch"]
    saved = {name: sys.modules.get(name) for name in names}
    try:
        sys.modules.update(stand_ins)
        _load("codeformer.basicsr.archs.vqgan_arch", archs / "vqgan_arch.py")
        return _load("codeformer.basicsr.archs.codeformer_arch", archs / "codeformer_arch.py").CodeFormer
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
