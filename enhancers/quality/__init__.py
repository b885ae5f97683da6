"""Live audio quality estimates: DNSMOS P.835 on sampled windows and cheap continuous signals.

``dnsmos.DnsmosModel`` is the shared model (one ONNX Runtime session for every stream);
``signals.SignalTracker`` is one stream's continuous state.  No aiortc, no event loop: the
media server's sampler (``mediaserver/quality.py``) feeds them from a thread of its own.
"""

from enhancers.quality.dnsmos import DnsmosModel, MosScore, shared_model
from enhancers.quality.signals import SideSignals, SignalTracker

__all__ = ["DnsmosModel", "MosScore", "SideSignals", "SignalTracker", "shared_model"]
