"""Workflows the browser tests serve (GENX_WORKFLOWS=...,browser.wf_viewer, tests/ on PYTHONPATH):
run data that would be markup, to show the viewer renders it as text."""

from __future__ import annotations

from collections.abc import AsyncIterator

from genx_ray import component, publish, workflow

# Sets window.__pwned if the page ever treats run data as HTML (or runs it as script).
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">'


@component
async def stream_payload(times: int) -> AsyncIterator[str]:
    for i in range(times):
        yield PAYLOAD if i % 2 == 0 else f" <b>{i}</b> "


@workflow(name="markup")
async def markup(times: int = 3) -> dict[str, str]:
    """Publish, stream and return markup."""
    publish("phase", {"html": PAYLOAD})
    text = await stream_payload(times)
    return {"html": PAYLOAD, "streamed": text}


@workflow(name="markup_fails")
async def markup_fails() -> str:
    """Fail with markup in the error."""
    raise ValueError(PAYLOAD)


# A component whose name is markup (a name may hold any character but "/:@{} \n"), for the
# console's step waterfall.
HOSTILE_STEP = "<img\tsrc=x\tonerror=window.__pwned=1>"


@component(name=HOSTILE_STEP)
async def hostile_step(text: str) -> str:
    return text


@workflow(name="hostile")
async def hostile() -> str:
    """A step named with markup, returning markup."""
    return await hostile_step(PAYLOAD)
