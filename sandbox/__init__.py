"""Run one untrusted Python script safely and fast: the sandbox side of pyexec.

The consumer side talks to this package only through :class:`Pool`, :class:`Job`,
:class:`Outcome` and :class:`PoolConfig`. Nothing here knows about NATS.
"""

from sandbox.api import ErrorInfo, InputFile, Job, Outcome, OutputFile
from sandbox.config import DEFAULT_ALLOWED_MODULES, PoolConfig
from sandbox.errors import PoolClosed, PoolError, SandboxError, WarmParentFailed
from sandbox.isolation import LAYERS, LayerStatus
from sandbox.netrules import parse_allow
from sandbox.pool import OnProgress, Pool

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "LAYERS",
    "ErrorInfo",
    "InputFile",
    "Job",
    "LayerStatus",
    "OnProgress",
    "Outcome",
    "OutputFile",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "SandboxError",
    "WarmParentFailed",
    "parse_allow",
]
