"""The hook: wraps MuseTalk's VAE.decode_latents so that every decoded batch goes through a
GFPGANEnhancer, without editing MuseTalk; undone by `uninstall()` or leaving the `with` block.
"""
from __future__ import annotations

import contextlib
import functools
import importlib

from musetalk_adapter.enhancer import GFPGANEnhancer

#: Where MuseTalk defines the VAE whose decode_latents returns the (B, 256, 256, 3) BGR faces.
VAE_MODULE = "musetalk.models.vae"
VAE_CLASS = "VAE"


def import_vae_class():
    """MuseTalk's VAE class; a clear error when MuseTalk is not importable from here."""
    try:
        module = importlib.import_module(VAE_MODULE)
    except ImportError as error:
        raise ImportError(
            f"cannot import {VAE_MODULE} ({error}); run from MuseTalk's root folder (where "
            f"the 'musetalk' package is), or add it to PYTHONPATH") from error
    return getattr(module, VAE_CLASS)


def install(enhancer: GFPGANEnhancer, vae_class=None):
    """Wrap `vae_class.decode_latents` (MuseTalk's by default) for every VAE, made before or
    after; returns a function that restores the original."""
    vae_class = vae_class or import_vae_class()
    original = vae_class.__dict__.get("decode_latents") or getattr(vae_class, "decode_latents")
    if getattr(original, "__gfpgan_original__", None) is not None:
        raise RuntimeError(f"{vae_class.__qualname__}.decode_latents is already hooked; "
                           f"uninstall the first hook before installing another")

    @functools.wraps(original)
    def decode_latents(self, *args, **kwargs):
        # MuseTalk iterates the result at once and reads pixels later (after all batches
        # offline, in its blending thread in realtime): the service works meanwhile.
        return enhancer.submit_batch(original(self, *args, **kwargs))

    decode_latents.__gfpgan_original__ = original
    inherited = "decode_latents" not in vae_class.__dict__
    vae_class.decode_latents = decode_latents

    def uninstall() -> None:
        if vae_class.__dict__.get("decode_latents") is decode_latents:
            if inherited:
                del vae_class.decode_latents
            else:
                vae_class.decode_latents = original

    return uninstall


@contextlib.contextmanager
def hooked(enhancer: GFPGANEnhancer, vae_class=None):
    """`with hooked(enhancer): run MuseTalk` - the hook for the block only."""
    uninstall = install(enhancer, vae_class)
    try:
        yield enhancer
    finally:
        uninstall()
