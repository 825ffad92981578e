"""A bare HTTP/1.1 client for load generation: keep-alive connections, JSON in and out, nothing
else. On two cores the load generator shares the machine with what it measures; httpx spends
~3 ms of CPU per request here, this ~0.2 ms, so the figures are the server's, not the client's."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlparse


class Connection:
    def __init__(self, base: str) -> None:
        url = urlparse(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request; the status and the decoded JSON body (None when empty)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        self._writer.write(head.encode() + payload)
        status_line = await self._reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length, chunked = 0, False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        data = await self._chunked() if chunked else await self._reader.readexactly(length)
        return status, json.loads(data) if data else None

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        out = b""
        while size := int((await self._reader.readline()).strip(), 16):
            out += await self._reader.readexactly(size)
            await self._reader.readline()
        await self._reader.readline()
        return out

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
