"""Run one untrusted Python script safely and fast: the sandbox side of pyexec.

The consumer side talks to this package only through :class:`Pool`, :class:`Job`,
:class:`Outcome` and :class:`PoolConfig`. Nothing here knows about NATS.
"""

from sandbox.api import ErrorInfo, InputFile, Job, Outcome, OutputFile
from sandbox.capacity import Capacity, Reservation, Slot
from sandbox.config import DEFAULT_ALLOWED_MODULES, PoolConfig
from sandbox.errors import CapacityFull, PoolClosed, PoolError, SandboxError, WarmParentFailed
from sandbox.isolation import LAYERS, LayerStatus
from sandbox.netrules import parse_allow
from sandbox.parent import ParentExit
from sandbox.pool import OnProgress, Pool, TierState

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "LAYERS",
    "Capacity",
    "CapacityFull",
    "ErrorInfo",
    "InputFile",
    "Job",
    "LayerStatus",
    "OnProgress",
    "Outcome",
    "OutputFile",
    "ParentExit",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "Reservation",
    "SandboxError",
    "Slot",
    "TierState",
    "WarmParentFailed",
    "parse_allow",
]
