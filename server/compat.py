"""Import shims that let basicsr, gfpgan and facexlib load on current torchvision.

basicsr 1.4.2 imports `torchvision.transforms.functional_tensor`, which torchvision removed in
0.17. Importing this module first registers a stand-in with the one function basicsr uses.
Every module of ours that imports gfpgan/basicsr/facexlib imports this first.
"""
from __future__ import annotations

import sys
import types


def install_functional_tensor_shim() -> None:
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional

    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = shim


install_functional_tensor_shim()
