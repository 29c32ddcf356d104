"""GFPGAN for MuseTalk through the gfpgan-service: every decoded face batch enhanced, overlapped
with the next UNet batch, every face back once and in order (see README.md, "Use with MuseTalk").
"""
from __future__ import annotations

from musetalk_adapter.config import (
    GFPGANSettings,
    SettingsError,
    add_arguments,
    load_yaml,
    resolve,
)
from musetalk_adapter.enhancer import GFPGANEnhancer, LazyFace, PendingBatch
from musetalk_adapter.hook import hooked, install
from musetalk_adapter.summary import RunSummary


def enhancer_from_musetalk(args, inference_config=None, *, client=None) -> GFPGANEnhancer:
    """The enhancer for an edited MuseTalk script: the `gfpgan:` section of its inference
    config (a path, a dict or OmegaConf's DictConfig), then its --gfpgan_* flags (see
    add_arguments); off unless enabled in one of them. Raises SettingsError at start."""
    document = inference_config
    if inference_config is None:
        path = getattr(args, "inference_config", None)
        document = load_yaml(path) if path else None
    elif isinstance(inference_config, str):
        document = load_yaml(inference_config)
    elif not isinstance(inference_config, dict):
        # OmegaConf's DictConfig (what MuseTalk loads), without importing omegaconf here.
        from omegaconf import OmegaConf

        document = OmegaConf.to_container(inference_config, resolve=True)
    return GFPGANEnhancer(resolve(document, args), client=client)


__all__ = ["GFPGANEnhancer", "GFPGANSettings", "LazyFace", "PendingBatch", "RunSummary",
           "SettingsError", "add_arguments", "enhancer_from_musetalk", "hooked", "install",
           "load_yaml", "resolve"]
