"""A loopback TCP proxy that injects network faults between sites and the coordinator.

Theory of operation: the proxy listens on a loopback port and, for every client that connects,
opens one connection to the upstream address and pumps raw bytes both ways. It never parses
what it forwards, so TLS passes through untouched and a site still pins the coordinator's
real certificate: the faults are the network's, not a man in the middle's. Each direction is
a reader task that stamps what it reads with the time it may leave and a writer task that
waits for that time and then paces the bytes out; a bounded queue between them passes TCP
back-pressure on to the sender. The faults, settable globally (every link, new ones too) or
for one link, are:

- ``delay(s)``: fixed one-way latency added to every byte, each direction;
- ``throttle(bytes_per_s)``: a bandwidth cap per direction;
- ``blackhole()``: both sockets stay open but everything is dropped, EOF included, so
  neither end learns anything (a stateful firewall or NAT that silently lost the flow);
- ``cut()``: close both sides now (a dropped link; reset, no goodbye);
- ``cut_after(n, direction)``: arm a one-shot cut that closes the first link (or the given
  one) to forward ``n`` more bytes in that direction, right after the ``n``-th byte: a link
  lost in the middle of a download (``"down"``) or an upload (``"up"``), deterministically;
- ``heal()``: back to a clean link.

A link's own setting wins over the global one; ``heal(link)`` makes it follow the global one
again. Counters: bytes forwarded up (client -> upstream) and down, and bytes dropped.

Use from an async test: ``async with FaultProxy(upstream) as proxy:`` (the proxy runs in the
test's loop). From a sync test: ``with FaultProxy(upstream) as proxy:``, or ``start()`` and
``stop()``, runs the proxy's loop in a thread. The command methods work from either: called
from another thread they run on the proxy's loop and wait for it. ``upstream`` may be set
after the start (``set_upstream``), for a coordinator that binds its port after the proxy's
port went into its invitations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

READ_SIZE = 64 * 1024
QUEUE_CHUNKS = 64  # per direction: up to 4 MiB in flight before the sender is pushed back
_EOF = b""


@dataclass(frozen=True, slots=True)
class Faults:
    """What a link suffers. ``None`` rate: no bandwidth cap."""

    delay_s: float = 0.0
    rate_bps: float | None = None
    blackhole: bool = False

    def __post_init__(self) -> None:
        if self.delay_s < 0:
            raise ValueError(f"delay must be >= 0 seconds, not {self.delay_s}")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"a throttle must be > 0 bytes/s, not {self.rate_bps}")


CLEAN = Faults()


@dataclass(frozen=True, slots=True)
class _Trigger:
    direction: str  # "up" or "down"
    nbytes: int
    link: int | None  # None: whichever link gets there first
    base: dict[int, int]  # counts of the links open when it was armed


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of one proxied connection."""

    id: int
    up: int  # bytes forwarded client -> upstream
    down: int  # bytes forwarded upstream -> client
    dropped: int  # bytes read and thrown away (black-holed)
    open: bool
    cut: bool  # closed by ``cut``


class _Link:
    def __init__(
        self,
        link_id: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        proxy: FaultProxy,
    ) -> None:
        self.id = link_id
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.faults: Faults | None = None  # None: follow the proxy's global faults
        self.counts = {"up": 0, "down": 0, "dropped": 0}
        self.is_open = True
        self.was_cut = False
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def effective(self) -> Faults:
        return self.faults if self.faults is not None else self.proxy.global_faults

    def stats(self) -> LinkStats:
        return LinkStats(
            self.id,
            self.counts["up"],
            self.counts["down"],
            self.counts["dropped"],
            self.is_open,
            self.was_cut,
        )

    def start(self) -> None:
        for name, (reader, _), (_, writer) in (
            ("up", self.client, self.upstream),
            ("down", self.upstream, self.client),
        ):
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
            self.tasks.append(asyncio.ensure_future(self._read(name, reader, queue)))
            self.tasks.append(asyncio.ensure_future(self._write(name, writer, queue)))
        self.tasks.append(asyncio.ensure_future(self._watch()))

    async def _read(
        self, name: str, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                data = _EOF
            faults = self.effective
            if faults.blackhole:
                self.counts["dropped"] += len(data)
                if not data:  # the sender left; the other end is not told
                    return
                continue
            await queue.put((time.monotonic() + faults.delay_s, data))
            if not data:
                return

    async def _write(
        self, name: str, writer: asyncio.StreamWriter, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        next_free = time.monotonic()  # when the throttled pipe is free again
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            view = memoryview(data)
            while view:
                rate = self.effective.rate_bps
                piece = view if rate is None else view[: max(1, int(rate / 50))]
                allowance = self.proxy._allowance(self, name)
                if allowance is not None:
                    piece = piece[:allowance]
                if rate is not None:
                    now = time.monotonic()
                    if next_free > now:
                        await asyncio.sleep(next_free - now)
                    next_free = max(now, next_free) + len(piece) / rate
                if self.effective.blackhole:  # switched on while this was queued
                    self.counts["dropped"] += len(view)
                    break
                try:
                    writer.write(piece)
                    await writer.drain()
                except (ConnectionError, OSError, RuntimeError):
                    self.abort()
                    return
                self.counts[name] += len(piece)
                view = view[len(piece) :]
                if allowance is not None and len(piece) == allowance:
                    self.proxy._trigger = None  # one shot
                    self.was_cut = True
                    self.abort()
                    return

    async def _watch(self) -> None:
        """The link is over when both directions have delivered their EOF."""
        pumps = [t for t in self.tasks if t is not asyncio.current_task()]
        await asyncio.gather(*pumps, return_exceptions=True)
        self.close()

    def abort(self) -> None:
        for _, writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self.close()

    def close(self) -> None:
        if not self.is_open:
            return
        self.is_open = False
        for _, writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class FaultProxy:
    """See the module docstring. ``upstream``: ``(host, port)`` of the real server."""

    def __init__(
        self,
        upstream: tuple[str, int] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.global_faults = CLEAN
        self._trigger: _Trigger | None = None
        self._links: dict[int, _Link] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.refused = 0  # clients closed because the upstream could not be reached

    # -- lifecycle: in the caller's loop ---------------------------------------------------

    async def start_async(self) -> FaultProxy:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop_async(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            link.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)  # let the cancelled pumps finish

    async def __aenter__(self) -> FaultProxy:
        return await self.start_async()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_async()

    # -- lifecycle: in a thread of its own -------------------------------------------------

    def start(self) -> FaultProxy:
        """Run the proxy's event loop in a daemon thread; returns once it listens."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already running")
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=main, name="fault-proxy", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def url(self, scheme: str = "wss") -> str:
        return f"{scheme}://{self.host}:{self.port}"

    def set_upstream(self, host: str, port: int) -> None:
        """Where new links go (links already open keep their upstream)."""
        self.upstream = (host, port)

    # -- commands --------------------------------------------------------------------------

    def delay(self, seconds: float, link: int | None = None) -> None:
        self._set(link, delay_s=seconds)

    def throttle(self, bytes_per_s: float | None, link: int | None = None) -> None:
        self._set(link, rate_bps=bytes_per_s)

    def blackhole(self, on: bool = True, link: int | None = None) -> None:
        self._set(link, blackhole=on)

    def heal(self, link: int | None = None) -> None:
        """A clean link again: globally (links with their own setting keep it), or for one
        link, which then follows the global setting."""

        def apply() -> None:
            if link is None:
                self.global_faults = CLEAN
            else:
                self._link(link).faults = None

        self._on_loop(apply)

    def cut(self, link: int | None = None) -> list[int]:
        """Close both sides of one link, or of every open link, now. Returns the ids cut."""

        def apply() -> list[int]:
            links = [self._link(link)] if link is not None else list(self._links.values())
            ids = []
            for item in links:
                if item.is_open:
                    item.was_cut = True
                    item.abort()
                    ids.append(item.id)
            return ids

        return self._on_loop(apply)

    def cut_after(self, nbytes: int, direction: str = "down", link: int | None = None) -> None:
        """Arm a one-shot cut: the first link (or ``link``) that forwards ``nbytes`` more in
        ``direction`` ("up": client -> upstream, "down": back) is cut right after them."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
        if nbytes < 0:
            raise ValueError(f"cut_after needs a byte count >= 0, not {nbytes}")

        def apply() -> None:
            if link is not None:
                self._link(link)
            base = {item.id: item.counts[direction] for item in self._links.values()}
            self._trigger = _Trigger(direction, nbytes, link, base)

        self._on_loop(apply)

    @property
    def armed(self) -> bool:
        """A ``cut_after`` has not fired yet."""
        return self._on_loop(lambda: self._trigger is not None)

    # -- observation -----------------------------------------------------------------------

    def links(self) -> list[LinkStats]:
        """Every link so far, oldest first, closed ones included."""
        return self._on_loop(lambda: [item.stats() for item in self._links.values()])

    def open_links(self) -> list[LinkStats]:
        return [s for s in self.links() if s.open]

    @property
    def bytes_up(self) -> int:
        return sum(s.up for s in self.links())

    @property
    def bytes_down(self) -> int:
        return sum(s.down for s in self.links())

    @property
    def bytes_forwarded(self) -> int:
        return sum(s.up + s.down for s in self.links())

    @property
    def bytes_dropped(self) -> int:
        return sum(s.dropped for s in self.links())

    def wait_for(
        self, predicate: Callable[[list[LinkStats]], bool], timeout: float = 10.0
    ) -> list[LinkStats]:
        """Block (sync tests) until ``predicate(links())`` holds; returns the links."""
        deadline = time.monotonic() + timeout
        while True:
            links = self.links()
            if predicate(links):
                return links
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy links never satisfied the condition: {links}")
            time.sleep(0.02)

    async def wait_for_async(
        self, predicate: Callable[[list[LinkStats]], bool], timeout: float = 10.0
    ) -> list[LinkStats]:
        """``wait_for`` for async tests."""
        deadline = time.monotonic() + timeout
        while True:
            links = self.links()
            if predicate(links):
                return links
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy links never satisfied the condition: {links}")
            await asyncio.sleep(0.01)

    # -- internals -------------------------------------------------------------------------

    def _set(self, link: int | None, **change: Any) -> None:
        Faults(**{**dataclasses.asdict(CLEAN), **change})  # validate in the caller's thread

        def apply() -> None:
            if link is None:
                self.global_faults = dataclasses.replace(self.global_faults, **change)
            else:
                item = self._link(link)
                item.faults = dataclasses.replace(item.effective, **change)

        self._on_loop(apply)

    def _allowance(self, item: _Link, direction: str) -> int | None:
        """Bytes ``item`` may still forward in ``direction`` before an armed cut fires."""
        trigger = self._trigger
        if trigger is None or trigger.direction != direction:
            return None
        if trigger.link is not None and trigger.link != item.id:
            return None
        done = item.counts[direction] - trigger.base.get(item.id, 0)
        return max(0, trigger.nbytes - done)

    def _link(self, link: int) -> _Link:
        try:
            return self._links[link]
        except KeyError:
            raise KeyError(f"no proxy link {link}; links: {sorted(self._links)}") from None

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy's loop: directly when called from it (or before the start),
        else through the loop, waiting for the result."""
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return fn()

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = self.upstream
        try:
            if upstream is None:
                raise ConnectionRefusedError("no upstream set")
            up = await asyncio.open_connection(*upstream)
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        link = _Link(next(self._ids), (reader, writer), up, self)
        self._links[link.id] = link
        link.start()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
