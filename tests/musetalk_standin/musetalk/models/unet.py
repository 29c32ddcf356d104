"""Stand-in for MuseTalk's UNet: paints a "mouth" whose colour depends on the audio frame, so
every generated face differs from its neighbours; STANDIN_UNET_MS per face mimics GPU time.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np

#: Rows of the 256x256 face the stand-in redraws (MuseTalk redraws the lower half).
MOUTH_ROWS = slice(170, 215)
MOUTH_COLS = slice(70, 186)


def mouth_colour(frame_index: int) -> np.ndarray:
    """RGB in [-1, 1] for the mouth of generated frame `frame_index`: far from its neighbours'."""
    rgb = np.array([(frame_index * 67) % 200 + 30, (frame_index * 131) % 200 + 30,
                    (frame_index * 29) % 200 + 30], dtype=np.float32)
    return rgb / 127.5 - 1.0


class UNetModel:
    dtype = np.float32

    def __call__(self, latent_batch, timesteps, encoder_hidden_states):
        # The audio features are the generated frames' indices (see utils.datagen).
        frames = np.asarray(encoder_hidden_states).reshape(-1)
        delay_ms = float(os.environ.get("STANDIN_UNET_MS", "0"))
        if delay_ms:
            time.sleep(delay_ms * len(frames) / 1000)  # the GPU's time; the GIL is free meanwhile
        out = np.array(latent_batch, dtype=np.float32, copy=True)
        for j, k in enumerate(frames):
            out[j, :, MOUTH_ROWS, MOUTH_COLS] = mouth_colour(int(k))[:, None, None]
        return SimpleNamespace(sample=out)


class UNet:
    def __init__(self):
        self.model = UNetModel()
        self.device = "cpu"
