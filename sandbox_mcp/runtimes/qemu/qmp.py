"""A minimal QMP client (qemu's JSON machine protocol on a unix socket): enough to ask a guest to shut down.

One connection per request: read the greeting, leave capabilities negotiation mode, run the
commands, close. Every read is bounded (line length and time), since the socket's peer is a
process we started but its answers come from a guest-facing program.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from ...errors import BackendError

__all__ = ["CTRL_ALT_DEL", "execute"]

_MAX_LINE = 64 * 1024

# The keys of an orderly shutdown request the guest's systemd acts on (ctrl-alt-del.target).
CTRL_ALT_DEL: dict[str, Any] = {
    "execute": "send-key",
    "arguments": {"keys": [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]},
}


async def _read_reply(stream: Any, buffer: bytearray) -> dict[str, Any]:
    """The next message that is not an asynchronous event."""
    while True:
        while b"\n" not in buffer:
            if len(buffer) > _MAX_LINE:
                raise BackendError("QMP: a reply line is too long; is the socket really qemu's?")
            chunk = await stream.receive(4096)
            buffer.extend(chunk)
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        message = json.loads(line)
        if "event" not in message:
            return message


async def execute(
    socket_path: Path,
    commands: Sequence[dict[str, Any]],
    timeout_s: float = 5.0,
    fds: Mapping[int, Sequence[int]] | None = None,
) -> list[Any]:
    """Run QMP ``commands`` (``{"execute": ..., "arguments": ...}``) in order; return their results.

    ``fds``: file descriptors sent along with command ``i`` (SCM_RIGHTS), e.g. for ``getfd``.

    Raises:
        BackendError: the socket cannot be reached, qemu answered with an error, or it did not
            answer within ``timeout_s``.
    """
    results = []
    try:
        with anyio.fail_after(timeout_s):
            async with await anyio.connect_unix(str(socket_path)) as stream:
                buffer = bytearray()
                greeting = await _read_reply(stream, buffer)
                if "QMP" not in greeting:
                    raise BackendError(f"QMP: unexpected greeting on {socket_path}")
                for i, command in enumerate(({"execute": "qmp_capabilities"}, *commands), -1):
                    line = json.dumps(command).encode() + b"\n"
                    if fds and fds.get(i):
                        await stream.send_fds(line, fds[i])
                    else:
                        await stream.send(line)
                    reply = await _read_reply(stream, buffer)
                    if "error" in reply:
                        raise BackendError(f"QMP {command['execute']}: {reply['error'].get('desc', reply['error'])}")
                    results.append(reply.get("return"))
    except (OSError, ValueError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        raise BackendError(f"QMP on {socket_path}: {exc}") from exc
    except TimeoutError as exc:
        raise BackendError(f"QMP on {socket_path}: no answer within {timeout_s} s") from exc
    return results[1:]
