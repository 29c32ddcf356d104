"""Stand-in for musetalk/models/vae.py: faces <-> "latents" (the face itself, RGB in [-1, 1],
NCHW); decode_latents returns what MuseTalk's does: (B, 256, 256, 3) uint8 BGR, negative stride.
"""
from __future__ import annotations

import numpy as np


class VAE:
    """Same methods as MuseTalk's VAE where the scripts call it."""

    #: Calls to decode_latents, so tests can tell the hook from the original.
    decode_calls = 0

    def __init__(self, model_path: str = "./models/sd-vae", resized_img: int = 256,
                 use_float16: bool = False):
        self.model_path = model_path
        self._resized_img = resized_img

    def get_latents_for_unet(self, img: np.ndarray) -> np.ndarray:
        """A (256, 256, 3) uint8 BGR crop -> (1, 3, 256, 256) float32 RGB in [-1, 1]."""
        rgb = np.ascontiguousarray(img[..., ::-1]).astype(np.float32)
        return (rgb / 127.5 - 1.0).transpose(2, 0, 1)[None]

    def decode_latents(self, latents) -> np.ndarray:
        """(B, 3, 256, 256) latents -> (B, 256, 256, 3) uint8 BGR, like vae.py:96-108: [0, 1],
        NHWC, x255, rounded, uint8, then channel-reversed (a view with a negative stride)."""
        type(self).decode_calls += 1
        image = np.clip(np.asarray(latents, dtype=np.float32) / 2 + 0.5, 0, 1)
        image = image.transpose(0, 2, 3, 1)
        image = (image * 255).round().astype("uint8")
        image = image[..., ::-1]  # RGB to BGR, as MuseTalk does
        return image
