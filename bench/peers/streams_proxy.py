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


async def main(port, bhost, bport):
    async def handle(creader, cwriter):
        try:
            breader, bwriter = await asyncio.open_connection(bhost, bport)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pipe(creader, bwriter), pipe(breader, cwriter))
        cwriter.close()
        bwriter.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    print("READY", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
