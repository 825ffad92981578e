"""What masking secrets costs each event a run emits (genx_ray.model.dump_event), against the
same event's JSON unmasked, in the same run: a step event, a published progress event, and an
output chunk holding a URL (one shape's clue present), with a secret setting and a Redis URL
with a password in the environment (as a worker has them)."""

from __future__ import annotations

import os

from bench.report import row, timed
from genx_ray.model import OutputEvent, ProgressEvent, StepCompletedEvent, StepRef, dump_event

N = 100_000


def main() -> None:
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-0123456789abcdefghijklmnop")
    os.environ.setdefault("GENX_REDIS_URL", "redis://:bench-password-0123@127.0.0.1:6379/0")
    run = "run_01M91FP5BSNHC8Z31YAJ9YACRX"
    events = {
        "step.completed": StepCompletedEvent(run_id=run, step=StepRef(id="0001:x", name="x")),
        "progress (publish)": ProgressEvent(run_id=run, kind="phase", data={"i": 7, "of": 20}),
        "output (a URL in it)": OutputEvent(
            run_id=run, data="see https://example.com/docs/page " + "lorem ipsum " * 30
        ),
    }
    for label, event in events.items():
        bare = timed(lambda e=event: [e.model_dump_json(exclude_none=True) for _ in range(N)]) / N
        masked = timed(lambda e=event: [dump_event(e) for _ in range(N)]) / N
        row(f"{label}: JSON", bare)
        row(f"{label}: JSON, secrets masked", masked, bare)


if __name__ == "__main__":
    main()
