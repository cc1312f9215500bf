"""One error hierarchy for the whole package.

Library code raises these; only the CLI turns them into messages and exit codes.
"""


class AidcError(Exception):
    """Base of every error aidc raises on purpose."""

    exit_code = 2

    def details(self) -> dict:
        """What a --json error document carries besides the message (JSON values)."""
        return {}


class SpecError(AidcError):
    """The cluster spec (stack file) is missing or invalid.

    `problems`: every (key path, expected) found, the first being this error's own, at most
    spec.MAX_LISTED_PROBLEMS of them; `problems_total`: how many there were in all."""

    def __init__(self, file: str, key: str, expected: str, problems: list[tuple[str, str]] | None = None,
                 problems_total: int | None = None):
        self.file, self.key, self.expected = file, key, expected
        self.problems = problems or [(key, expected)]
        self.problems_total = problems_total or len(self.problems)
        super().__init__(f"{file}: {key}: {expected}")

    def details(self) -> dict:
        return {"file": self.file, "problems": [{"key": k, "expected": e} for k, e in self.problems],
                "problems_total": self.problems_total}


class DeviceError(AidcError):
    """A device backend could not answer."""


class NoDriverError(DeviceError):
    """No NVIDIA driver / NVML library on this machine."""


class DeviceHang(DeviceError):
    """A device call did not return within its timeout: itself a fault."""


class AuditError(AidcError):
    """The audit log is unreadable or fails verification."""

    exit_code = 1


class PolicyRefusal(AidcError):
    """A guarded action was refused by policy (blast radius, dry-run, lock)."""

    exit_code = 3


class StateError(AidcError):
    """The controller's state backend is misconfigured, unreachable, or its schema is not one
    this aidc knows (aidc.state)."""


class BurninError(AidcError):
    """A burn-in run could not complete (a node process died or the run timed out).

    Nodes that complete and fail their checks are not errors: they are verdicts.
    """


class CompressError(AidcError):
    """A compression benchmark was asked for something invalid (unknown technique, bad sparsity)."""
