"""Naive peer: a TCP proxy as a plain asyncio.Protocol pair on uvloop.

python bench/peers/protocol_proxy.py LISTEN_PORT BACKEND_HOST BACKEND_PORT [...]

(more triples: more routes in the same process)
"""
import asyncio
import sys

import uvloop


class Side(asyncio.Protocol):
    def __init__(self, peer=None):
        self.peer, self.transport = peer, None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.peer.transport.write(data)

    def eof_received(self):
        if self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True

    def pause_writing(self):
        self.peer.transport.pause_reading()

    def resume_writing(self):
        self.peer.transport.resume_reading()

    def connection_lost(self, exc):
        if self.peer and self.peer.transport:
            self.peer.transport.close()


class Client(Side):
    def __init__(self, backend):
        super().__init__()
        self.backend, self.early, self.early_eof = backend, [], False

    def connection_made(self, transport):
        self.transport = transport
        asyncio.get_running_loop().create_task(self.connect())

    def data_received(self, data):
        if self.peer is None:           # uvloop reads before the backend is up: keep it
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self):
        if self.peer is None:
            self.early_eof = True
            return True
        return super().eof_received()

    async def connect(self):
        loop = asyncio.get_running_loop()
        try:
            _, self.peer = await loop.create_connection(lambda: Side(self), *self.backend)
        except OSError:
            self.transport.close()
            return
        for data in self.early:
            self.peer.transport.write(data)
        if self.early_eof:
            self.peer.transport.write_eof()


async def main(routes):
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda b=(bhost, bport): Client(b), "127.0.0.1", port,
                                        backlog=4096) for port, bhost, bport in routes]
    print("READY", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    # LISTEN_PORT BACKEND_HOST BACKEND_PORT, repeated for more routes in one process
    args = sys.argv[1:]
    uvloop.run(main([(int(args[i]), args[i + 1], int(args[i + 2])) for i in range(0, len(args), 3)]))
