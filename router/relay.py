"""Relaying an engine's answer to the client, streamed (SSE) or not, across preemption moves.

A `Relay` is the upstream side of one proxied request. It holds the engine response being read now;
when a move continues the request on another replica, the continuation's response replaces it, so
`aclose` always closes the current one (closing an unfinished response aborts it in SGLang).

- Not movable (the profile has no preemptor): SSE bytes are relayed untouched, events counted as
  generated tokens; a non-streamed answer is read whole.
- Movable, streamed: event by event (never a partial event), so a move cuts the stream at an event
  boundary; the source's events after the cut (and its abort/[DONE]) are dropped, the continuation
  starts from exactly the text forwarded, and its events are rewritten to read as the same answer
  (original id, no second role chunk, cumulative text and counts for /generate).
- Movable, not streamed: the source's partial answer (SGLang returns it with finish reason `abort`)
  and the continuation's are merged into one.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator, Awaitable, Callable

from lenpred.router.continuation import Part, merge, part_of
from lenpred.router.lifecycle import RequestState, RequestTable, Tracked
from lenpred.router.moves import Mover
from lenpred.router.upstream import ERRORS, UpstreamResponse



def sse_json(ev: bytes) -> dict | None:
    """The JSON object of one SSE `data:` event (None for [DONE], comments and non-objects)."""
    data = ev.strip()
    if not data.startswith(b"data:"):
        return None
    data = data[5:].strip()
    if data == b"[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _finish_of(obj: dict, api: str) -> str | None:
    if api == "generate":
        fr = (obj.get("meta_info") or {}).get("finish_reason")
        return (fr.get("type") or "stop") if isinstance(fr, dict) else (str(fr) if fr else None)
    choices = obj.get("choices") or []
    if not choices:
        return "usage"     # the usage chunk comes after the finish
    fr = choices[0].get("finish_reason")
    return str(fr) if fr else None


def event_kind(ev: bytes, api: str) -> str:
    """content (a token, or a role chunk) | finish (the answer's end, [DONE], usage) | abort (the
    engine's abort or an error event: never forwarded while a move is pending)."""
    if ev.strip() == b"data: [DONE]":
        return "finish"
    obj = sse_json(ev)
    if obj is None:
        return "content"
    if "error" in obj:
        return "abort"
    fr = _finish_of(obj, api)
    if fr is None:
        return "content"
    return "abort" if fr == "abort" else "finish"


def part_of_events(events: list[bytes], api: str) -> Part:
    """What the client received from one attempt's forwarded events."""
    objs = [o for o in map(sse_json, events) if o is not None]
    if api == "generate":
        last = objs[-1] if objs else {}
        meta = last.get("meta_info") or {}
        ids = last.get("output_ids") or []
        return Part(last.get("text", ""), list(ids), int(meta.get("completion_tokens", len(ids))), "abort", last)
    texts = []
    for o in objs:
        c = (o.get("choices") or [{}])[0]
        t = (c.get("delta") or {}).get("content") if api == "chat" else c.get("text")
        if t:
            texts.append(t)
    return Part("".join(texts), [], len(texts), "abort", objs[0] if objs else {})


def rewriter(api: str, rid: str, parts: list[Part]) -> Callable[[bytes], bytes | None]:
    """Rewrite a later attempt's events so the client reads one answer: the original id and, after
    earlier parts (a move), no second role chunk and (for /generate, whose text and counts are
    cumulative) the earlier parts prepended."""
    text = "".join(p.text for p in parts)
    ids = [i for p in parts for i in p.ids]
    done = sum(p.tokens for p in parts)

    def rewrite(ev: bytes) -> bytes | None:
        obj = sse_json(ev)
        if obj is None:
            return ev
        if api == "generate":
            obj["text"] = text + obj.get("text", "")
            if "output_ids" in obj:
                obj["output_ids"] = ids + list(obj["output_ids"] or [])
            meta = obj.setdefault("meta_info", {})
            meta["id"] = rid
            if "completion_tokens" in meta:
                meta["completion_tokens"] = done + int(meta["completion_tokens"])
            if isinstance(meta.get("finish_reason"), dict) and "length" in meta["finish_reason"]:
                meta["finish_reason"]["length"] = meta.get("completion_tokens")
        else:
            if "id" in obj:
                obj["id"] = rid
            choices = obj.get("choices") or []
            if parts and api == "chat" and choices and choices[0].get("finish_reason") is None:
                delta = choices[0].get("delta") or {}
                if "role" in delta and not delta.get("content"):
                    return None   # the continuation's own opening role chunk
            usage = obj.get("usage")
            if isinstance(usage, dict) and "completion_tokens" in usage:
                usage["completion_tokens"] += done
                usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage["completion_tokens"]
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    return rewrite


def restore_id(payload: dict, api: str, rid: str) -> dict:
    """A whole answer from a later attempt (`<rid>-r1`), under the request's own id."""
    if api == "generate":
        meta = payload.get("meta_info")
        if isinstance(meta, dict):
            meta["id"] = rid
    elif "id" in payload:
        payload["id"] = rid
    return payload


def sse_error(message: str, status: int) -> bytes:
    """How a stream that broke after it started ends: an OpenAI-style error event, then [DONE]."""
    err = {"error": {"message": message, "type": "upstream_error", "code": status}}
    return b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"


def _count_events(chunk: bytes) -> int:
    """Generated tokens in relayed SSE bytes: one per `data:` event but [DONE] (SGLang streams one
    event per detokenizer step, one token at the default stream interval)."""
    return chunk.count(b"data:") - chunk.count(b"data: [DONE]")


class Relay:
    """The upstream side of one proxied request (see the module docstring). `stall_s` bounds the
    gap between two chunks of a stream; a stall or a broken stream ends the client's stream with
    an SSE error event and [DONE], and is reported through `on_break` (the replica is blamed and the
    engine request aborted)."""

    def __init__(self, t: Tracked, table: RequestTable, mover: Mover, api: str, body: dict, resp: UpstreamResponse,
                 send: Callable[[dict], Awaitable[UpstreamResponse]], on_done: Callable[[Tracked], None],
                 on_break: Callable[[Tracked, str], None], stall_s: float):
        self.t, self.table, self.mover = t, table, mover
        self.api, self.body, self.resp = api, body, resp
        self._send, self._on_done, self._on_break = send, on_done, on_break
        self.stall_s = stall_s

    async def aclose(self) -> None:
        await self.resp.aclose()

    def _done(self) -> None:
        self.table.end(self.t, ok=True)
        self._on_done(self.t)

    def _broken(self, why: str, status: int = 502) -> bytes:
        """The stream cannot go on: fail the request, blame the replica, end the client's stream."""
        self.t.error = why
        self.table.end(self.t, ok=False)
        self._on_break(self.t, why)
        return sse_error(why, status)

    def _stall_message(self) -> str:
        return f"the replica sent nothing for {self.stall_s:g}s (stalled); the answer is incomplete"

    async def _chunks(self) -> AsyncIterator[bytes]:
        """The current response's chunks, each within the stall deadline (TimeoutError past it)."""
        it = self.resp.aiter_raw()
        while True:
            try:
                async with asyncio.timeout(self.stall_s):
                    chunk = await anext(it)
            except StopAsyncIteration:
                return
            yield chunk

    async def _continue(self, parts: list[Part]) -> bool:
        """Send the moved request's next attempt; True when it answers 200 (RUNNING again)."""
        nxt = self.mover.next_attempt(self.t, self.body, self.api, parts)
        self.resp = await self._send(nxt)
        if self.resp.status_code != 200:
            return False
        self.table.transition(self.t, RequestState.RUNNING)
        return True

    # -- streamed ----------------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[bytes]:
        """Relay SSE bytes untouched (a request that cannot move and kept its rid)."""
        req = self.t.req
        try:
            async for chunk in self._chunks():
                req.generated += _count_events(chunk)
                yield chunk
        except TimeoutError:
            yield self._broken(self._stall_message(), 504)
            return
        except ERRORS as e:
            yield self._broken(f"the replica's stream broke: {type(e).__name__}: {e}")
            return
        self._done()

    async def stream_movable(self) -> AsyncIterator[bytes]:
        t, req, api = self.t, self.t.req, self.api
        parts: list[Part] = []
        events: list[bytes] = []   # forwarded events of the current attempt, as the engine sent them
        # a re-dispatched request answers under its attempt rid: rewrite the ids back
        rewrite = rewriter(api, req.rid, []) if t.attempt_rid != req.rid else None
        ended = False              # the answer's final event went out: no cut after it
        buf = b""
        while True:
            cut = False
            try:
                async for chunk in self._chunks():
                    buf += chunk
                    while True:
                        i = buf.find(b"\n\n")
                        if i < 0:
                            break
                        ev, buf = buf[:i + 2], buf[i + 2:]
                        if t.move is not None and not ended:
                            if event_kind(ev, api) in ("content", "abort"):
                                cut = True
                                break
                            ended = True           # finished before the move landed
                            self.mover.too_late(t)
                        out = ev if rewrite is None else rewrite(ev)
                        events.append(ev)
                        if out is None:
                            continue
                        req.generated += _count_events(out)
                        yield out
                    if cut:
                        break
            except (TimeoutError, *ERRORS) as e:
                if t.move is None:         # no move pending: the answer broke
                    yield self._broken(self._stall_message(), 504) if isinstance(e, TimeoutError) else \
                        self._broken(f"the replica's stream broke: {type(e).__name__}: {e}")
                    return
                cut = True                 # the source was being aborted anyway: continue elsewhere
            if not cut:
                break
            await self.resp.aclose()
            parts.append(part_of_events(events, api))
            parts = [p for p in parts if p.tokens]
            req.generated = sum(p.tokens for p in parts)
            buf, events = b"", []
            try:
                if not await self._continue(parts):
                    yield self._broken(f"the continuation of the moved answer was refused "
                                       f"({self.resp.status_code})")
                    return
            except ERRORS as e:
                yield self._broken(f"the continuation of the moved answer failed: {type(e).__name__}: {e}")
                return
            req.pinned = False
            rewrite = rewriter(api, req.rid, parts)
        self._done()

    # -- not streamed ------------------------------------------------------------------------
    async def read(self) -> bytes:
        """The whole answer (a request that cannot move)."""
        return await self.resp.aread()

    async def read_movable(self) -> bytes:
        """Nothing reached the client yet, so an error from a source that is being moved away from
        only means continuing from the parts gathered so far."""
        t, api = self.t, self.api
        parts: list[Part] = []
        while True:
            try:
                content = await self.resp.aread()
            except ERRORS:
                if t.move is None:
                    raise
                content = b""
            await self.resp.aclose()
            if t.move is None:
                break
            part = None
            if self.resp.status_code == 200:
                with contextlib.suppress(ValueError):
                    part = part_of(json.loads(content), api)
            if part is not None and part.finish != "abort":   # it ended before the abort landed
                self.mover.too_late(t)
                break
            if part is not None and part.tokens:
                parts.append(part)
            if await self._continue(parts):
                t.req.pinned = False
        if parts and self.resp.status_code == 200:
            with contextlib.suppress(ValueError):
                parts.append(part_of(json.loads(content), api))
                content = json.dumps(merge(parts, api)).encode()
        return content
