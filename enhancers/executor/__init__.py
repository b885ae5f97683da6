"""The batched enhancement executor: one engine that runs every stage for all streams.

Public API: :class:`Executor` and :class:`ExecutorConfig` (:mod:`.core`,
:mod:`.config`), the per-stream handle :class:`ExecutorStream` (:mod:`.stream`)
and what it gets back, :class:`ProcessedChunk`.  Inside: the worker back-end
interface :class:`Worker` (:mod:`.worker`) with its thread (:mod:`.thread`)
and process (:mod:`.process`, :mod:`.child`, over :mod:`.transport`)
implementations, the batch runner (:mod:`.batch`), the messages between them
(:mod:`.messages`), stage loading (:mod:`.loading`), fault recovery
(:mod:`.recovery`), accelerator loss (:mod:`.device`) and admission control
(:mod:`.admission`).
"""

from enhancers.executor.config import ExecutorConfig
from enhancers.executor.core import Executor
from enhancers.executor.loading import resolve_device
from enhancers.executor.messages import ProcessedChunk
from enhancers.executor.recovery import RecoveryPolicy
from enhancers.executor.stream import ExecutorStream
from enhancers.executor.worker import COUNTER_KEYS, Worker

__all__ = [
    "COUNTER_KEYS",
    "Executor",
    "ExecutorConfig",
    "ExecutorStream",
    "ProcessedChunk",
    "RecoveryPolicy",
    "Worker",
    "resolve_device",
]
