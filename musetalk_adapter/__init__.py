"""GFPGAN for MuseTalk through the gfpgan-service: every decoded face batch enhanced, overlapped
with the next UNet batch, every face back once and in order (see README.md, "Use with MuseTalk").
"""
from __future__ import annotations

import os

from musetalk_adapter.config import (
    YAML_SECTION,
    GFPGANSettings,
    SettingsError,
    add_arguments,
    load_yaml,
    resolve,
)
from musetalk_adapter.enhancer import GFPGANEnhancer, LazyFace, ModelMismatch, PendingBatch
from musetalk_adapter.hook import hooked, install
from musetalk_adapter.summary import RunSummary


def enhancer_from_musetalk(args, inference_config=None, *, client=None) -> GFPGANEnhancer:
    """The enhancer for an edited MuseTalk script: the `gfpgan:` section of its inference
    config, then its --gfpgan_* flags (see add_arguments); off unless enabled in one of them.
    Raises SettingsError at start (a bad setting, or a service serving another model).

    `inference_config` is what MuseTalk loaded (OmegaConf's DictConfig, or a dict): the
    `gfpgan:` section is taken out of it here, so that MuseTalk's loop over its tasks or
    avatars never meets it (realtime_inference.py would die on it). Given a path instead (or
    nothing: args.inference_config), the file is read and left as it is.
    """
    if inference_config is None or isinstance(inference_config, (str, os.PathLike)):
        path = inference_config if inference_config is not None else getattr(args, "inference_config", None)
        document = load_yaml(path) if path else None
    else:
        section = inference_config.pop(YAML_SECTION, None)
        if section is not None and not isinstance(section, dict):
            # OmegaConf's DictConfig (what MuseTalk loads), without importing omegaconf here.
            from omegaconf import OmegaConf

            section = OmegaConf.to_container(section, resolve=True)
        document = {YAML_SECTION: section}
    return GFPGANEnhancer(resolve(document, args), client=client)


__all__ = ["GFPGANEnhancer", "GFPGANSettings", "LazyFace", "ModelMismatch", "PendingBatch",
           "RunSummary",
           "SettingsError", "add_arguments", "enhancer_from_musetalk", "hooked", "install",
           "load_yaml", "resolve"]
