"""The sandbox package's exceptions, grouped by what the caller does about them."""


class SandboxError(Exception):
    """Root of every exception the sandbox package raises to its caller."""


class PoolError(SandboxError):
    """The pool cannot run a job right now; the caller answers with a service error."""


class PoolClosed(PoolError):
    """The pool is stopped or stopping and takes no more jobs."""


class WarmParentFailed(PoolError):
    """The warm parent process could not be started or keeps dying."""


class ProtocolError(SandboxError):
    """A frame on a parent/child pipe was malformed, too large or cut short."""


class PolicyViolation(Exception):
    """Raised inside a run when the script reaches something the policy refuses.

    It derives from ``Exception`` so that it travels through the script like any
    other error, but the run remembers it: a script that catches it still ends
    with ``policy_violation``.
    """
