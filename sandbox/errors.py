"""The sandbox package's exceptions, grouped by what the caller does about them."""

import os


class SandboxError(Exception):
    """Root of every exception the sandbox package raises to its caller."""


class PoolError(SandboxError):
    """The pool cannot run a job right now; the caller answers with a service error."""


class PoolClosed(PoolError):
    """The pool is stopped or stopping and takes no more jobs."""


class WarmParentFailed(PoolError):
    """The warm parent process could not be started or keeps dying."""


class CapacityFull(PoolError):
    """Every worker is busy and the request may not wait (queue full or waited too long)."""


class ProtocolError(SandboxError):
    """A frame on a parent/child pipe was malformed, too large or cut short."""


class PolicyViolation(Exception):
    """Raised inside a run when the script reaches something the policy refuses.

    It derives from ``Exception`` so that it travels through the script like any
    other error, but the run remembers it: a script that catches it still ends
    with ``policy_violation``.
    """


class SyscallError(SandboxError):
    """A system call an isolation layer needs failed; ``errno`` says why."""

    def __init__(self, what: str, errno: int) -> None:
        super().__init__(f"{what} failed: {os.strerror(errno)}")
        self.errno = errno


class NotSerializable(SandboxError):
    """The result holds a value the contract has no JSON form for."""


class OutputFlood(Exception):
    """Raised into the script when it prints far more than the stdout limit keeps."""
