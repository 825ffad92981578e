"""All genx-ray exceptions.

    GenxError                      root: catch this to catch anything genx-ray raises
    ├── UserError                  misuse: fix the code or the configuration, retrying won't help
    │   ├── ConfigError            a setting is missing or malformed (names the setting)
    │   ├── NondeterminismError    a restarted run took another path than its journal recorded
    │   ├── Unplaceable            a placed component whose function cannot be sent to the cluster
    │   └── InputInvalid           a workflow input fails the workflow's schema (HTTP 422)
    ├── NotFound                   HTTP 404
    │   ├── RunNotFound
    │   └── WorkflowNotFound
    ├── Conflict                   HTTP 409: the request contradicts the current state
    │   ├── InvalidTransition      a run status change that is not allowed (e.g. out of terminal)
    │   ├── NotWaitingForInput     input posted to a run that does not wait for it
    │   ├── IdempotencyConflict    an Idempotency-Key reused with another input
    │   └── RunNotEnded            a rerun asked of a run that has not ended
    ├── QuotaExceeded              HTTP 429: a tenant over its GENX_TENANT_LIMITS (Retry-After)
    ├── RedisUnavailable           nothing answers at the Redis URL
    ├── StepError                  a step failed for good (after retries); raised into the workflow
    │   └── StepTimeout            ... its last attempt timed out
    ├── InputTimeout               ``wait_for_input`` passed its deadline; raised into the workflow
    ├── ChildFailed                a child run the workflow waited for failed or was cancelled
    ├── RunFailed                  ``handle.result()`` of a run that failed
    ├── RunCancelled               a run stopped because it was cancelled
    └── Fenced                     a superseded attempt tried to write (it must stop)

Signals a component raises to steer its retries (not errors of genx-ray itself):
``RetryAfter(delay)`` sets the next retry delay; ``NonRetryable(...)`` stops retrying now.

Each error carries ``status_code`` and ``code``: the gateway turns any ``GenxError`` into
``{"error": {"code", "message"}}`` with that status in one handler.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GenxError(Exception):
    """The root of everything genx-ray raises; ``code`` and ``status_code`` say what it is."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for name, value in fields.items():
            setattr(self, name, value)


class UserError(GenxError):
    """Misuse: fix the code or the configuration; retrying won't help."""

    status_code = 400
    code = "invalid_request"


class BatchUnsupported(UserError):
    """``map(llm="batch")`` against a provider without the Batch API (404/405 on its files or
    batches): ``model`` names the model whose calls could not travel in a batch."""

    code = "batch_unsupported"

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


class ConfigError(UserError):
    """A setting is missing or malformed: ``setting`` names it (an environment variable, or an
    argument such as ``fallback``). Raised when a process starts, never an hour into a run."""

    code = "config_error"

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}", setting=setting)
        self.setting = setting


class NondeterminismError(UserError):
    """A restarted run took another path than its journal recorded (another component at a
    step's position, or another input): ``step_id`` names the step. Workflow code must take the
    same path for the same input."""

    code = "nondeterminism"

    def __init__(self, step_id: str, message: str) -> None:
        super().__init__(f"step {step_id}: {message}", step_id=step_id)
        self.step_id = step_id


class Unplaceable(UserError):
    """A component whose function cannot be sent to another process (it does not pickle: a
    lock, a client or an open file in its closure)."""


class InputInvalid(UserError):
    status_code = 422
    code = "invalid_input"

    def __init__(self, message: str, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []

    @classmethod
    def field(cls, name: str, message: str) -> InputInvalid:
        """The error for one named field: ``"<name>: <message>"``."""
        return cls(f"{name}: {message}", [{"loc": [name], "msg": message, "type": "value_error"}])


class NotFound(GenxError):
    status_code = 404
    code = "not_found"


class RunNotFound(NotFound):
    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r}")
        self.run_id = run_id


class WorkflowNotFound(NotFound):
    code = "workflow_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no workflow {name!r}")
        self.name = name


class Conflict(GenxError):
    status_code = 409
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"

    def __init__(self, run_id: str, current: str, target: str) -> None:
        super().__init__(f"run {run_id} is {current}; it cannot become {target}")
        self.run_id, self.current, self.target = run_id, current, target


class NotWaitingForInput(Conflict):
    code = "not_waiting_for_input"

    def __init__(self, run_id: str, why: str) -> None:
        super().__init__(f"run {run_id} {why}")
        self.run_id = run_id


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class RunNotEnded(Conflict):
    """A rerun of a run that has not ended (its journal is not final yet)."""

    code = "run_not_ended"

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(
            f"run {run_id} is {status}: only a run that ended is rerun (cancel it first)"
        )
        self.run_id, self.status = run_id, status


class QuotaExceeded(GenxError):
    """A tenant started more runs than its quota allows (``GENX_TENANT_LIMITS``); nothing was
    created. ``retry_after``: seconds until a retry may succeed."""

    status_code = 429
    code = "quota_exceeded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RedisUnavailable(GenxError):
    status_code = 503
    code = "redis_unavailable"

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Redis at {url} does not answer: {reason}")
        self.url = url


class StepError(GenxError):
    """A step failed after its retries. The workflow may catch it and fall back."""

    code = "step_failed"

    def __init__(
        self, step_id: str, component: str, attempt: int, error_type: str, message: str
    ) -> None:
        super().__init__(
            f"step {step_id} failed after {attempt} attempt(s): {error_type}: {message}"
        )
        self.step_id, self.component, self.attempt = step_id, component, attempt
        self.error_type, self.error_message = error_type, message


class StepTimeout(StepError):
    """A step failed after its retries, its last attempt having timed out."""

    code = "step_timeout"


class InputTimeout(GenxError):
    """``wait_for_input`` reached its deadline without input; the workflow may catch it."""

    code = "input_timeout"

    def __init__(self, run_id: str, input_id: str, deadline: float) -> None:
        super().__init__(f"run {run_id}: no input {input_id} by its deadline")
        self.run_id, self.input_id, self.deadline = run_id, input_id, deadline


class ChildFailed(GenxError):
    """A child run ended without output (failed or cancelled); the parent may catch it."""

    code = "child_failed"

    def __init__(self, child_id: str, status: str, error_type: str, message: str) -> None:
        super().__init__(f"child run {child_id} {status}: {error_type}: {message}")
        self.child_id, self.status = child_id, status
        self.error_type, self.error_message = error_type, message


class RunFailed(GenxError):
    """What ``handle.result()`` raises for a run that failed (its error's type and message)."""

    code = "run_failed"

    def __init__(self, run_id: str, error_type: str, message: str) -> None:
        super().__init__(f"run {run_id} failed: {error_type}: {message}")
        self.run_id, self.error_type, self.error_message = run_id, error_type, message


class RunCancelled(GenxError):
    """A run stopped because it was cancelled (``handle.result()``, or inside its steps)."""

    code = "run_cancelled"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} was cancelled")
        self.run_id = run_id


class Fenced(GenxError):
    code = "fenced"

    def __init__(self, run_id: str, attempt: int) -> None:
        super().__init__(f"run {run_id}: attempt {attempt} was superseded; it may write nothing")
        self.run_id, self.attempt = run_id, attempt


class RetryAfter(Exception):
    """Raise from a component to retry after ``delay`` seconds (e.g. an LLM ``Retry-After``)."""

    def __init__(self, delay: float, message: str = "") -> None:
        super().__init__(message or f"retry after {delay:.3g}s")
        self.delay = delay


class NonRetryable(Exception):
    """Raise from a component (or wrap an error in it) to fail the step without more attempts."""
