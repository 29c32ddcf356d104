"""Stand-in for musetalk/utils/utils.py: load_all_model and datagen (batches of audio features
and latents, the latents cycling over the video's frames), as MuseTalk's scripts call them.
"""
from __future__ import annotations

import os

import numpy as np

from musetalk.models.unet import UNet
from musetalk.models.vae import VAE


def load_all_model(unet_model_path=None, vae_type="sd-vae", unet_config=None, device=None):
    return VAE(), UNet(), (lambda features: features)


def get_file_type(path: str) -> str:
    return "dir" if os.path.isdir(path) else "unknown"


def datagen(whisper_chunks, vae_encode_latents, batch_size=8, delay_frame=0, device=None):
    """Yield (audio features, latents) in batches of batch_size; generated frame k uses the
    latents of video frame k % len(latents) (the cycle), the last batch may be shorter."""
    whisper_batch, latent_batch = [], []
    for k, chunk in enumerate(whisper_chunks):
        whisper_batch.append(chunk)
        latent_batch.append(vae_encode_latents[(k + delay_frame) % len(vae_encode_latents)])
        if len(latent_batch) >= batch_size:
            yield np.stack(whisper_batch), np.concatenate(latent_batch)
            whisper_batch, latent_batch = [], []
    if latent_batch:
        yield np.stack(whisper_batch), np.concatenate(latent_batch)
