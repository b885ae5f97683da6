"""Dereverberation: batched recursive (online) WPE on a streaming STFT."""

from enhancers.dereverb.stage import DereverbStage
from enhancers.dereverb.stft import StreamingStft
from enhancers.dereverb.wpe import RecursiveWpe, WpeState

__all__ = ["DereverbStage", "RecursiveWpe", "StreamingStft", "WpeState"]
