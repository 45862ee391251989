"""A TCP proxy that a test can cut, stall and restore, to take the database away from a
daemon without touching the server (psycopg's tests/fix_proxy.py does the same)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class CuttableProxy:
    """Forwards 127.0.0.1:`port` to `upstream`. `cut()` drops every connection and refuses
    new ones; `stall()` keeps them open but forwards nothing, as a network that loses
    every packet for a while would; `restore()` ends either."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        # Every accepted transport, from the moment it exists: a handler task cancelled
        # before its first step would otherwise leave its socket open, to warn later.
        self._accepted: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(self._loop.create_server(self._protocol, "127.0.0.1", 0))
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        accepted = self._accepted

        class Tracked(asyncio.StreamReaderProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if isinstance(transport, asyncio.Transport):
                    accepted.add(transport)
                super().connection_made(transport)

        return Tracked(asyncio.StreamReader(), self._accept)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                end.transport.abort()
                self._writers.discard(end)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                # A stalled link holds what it read; the kernel buffers fill up behind it
                # and the peers simply wait, with their connections still open.
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones, as a dead network would."""

        def drop() -> None:
            self._cut = True
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(drop)

    def stall(self) -> None:
        """Stop forwarding in both directions, keeping every connection open."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def restore(self) -> None:
        """Accept and forward connections again, and let stalled data through."""

        def mend() -> None:
            self._cut = False
            self._flowing.set()

        self._loop.call_soon_threadsafe(mend)

    @contextmanager
    def running(self) -> Iterator[CuttableProxy]:
        self._thread.start()
        self._ready.wait(5)
        try:
            yield self
        finally:
            self.cut()
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        for transport in self._accepted:
            transport.abort()
        # Transports close their sockets on the next turns of the loop: let them.
        await asyncio.sleep(0.05)
