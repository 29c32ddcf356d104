"""Stand-ins for MuseTalk's models: the VAE (whose decode_latents the adapter hooks) and the UNet.
Numpy only; the UNet can be made to take time, to measure overlap."""
