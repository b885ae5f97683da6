"""Server-side acoustic echo cancellation, batched across streams.

:class:`~enhancers.aec.stage.EchoCancellerStage` (stage name ``aec``) is the
batched stage; :class:`~enhancers.aec.apm.EchoCanceller` wraps one stream of
it behind a WebRTC-APM-like API.
"""

from enhancers.aec.apm import EchoCanceller
from enhancers.aec.stage import EchoCancellerStage

__all__ = ["EchoCanceller", "EchoCancellerStage"]
