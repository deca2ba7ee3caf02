"""Naive peer: a TCP proxy with asyncio streams on uvloop, as a Python user would write it.

python bench/peers/streams_proxy.py LISTEN_PORT BACKEND_HOST BACKEND_PORT
"""
import asyncio
import sys

import uvloop


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def route(port, bhost, bport):
    async def handle(creader, cwriter):
        try:
            breader, bwriter = await asyncio.open_connection(bhost, bport)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pipe(creader, bwriter), pipe(breader, cwriter))
        cwriter.close()
        bwriter.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)


async def main(routes):
    servers = [await route(*r) for r in routes]
    print("READY", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    # LISTEN_PORT BACKEND_HOST BACKEND_PORT, repeated for more routes in one process
    args = sys.argv[1:]
    uvloop.run(main([(int(args[i]), args[i + 1], int(args[i + 2])) for i in range(0, len(args), 3)]))
