"""Naive peer: a TLS-terminating TCP proxy on uvloop's SSL transport (asyncio.Protocol pair,
bench/peers/protocol_proxy.py's, with an ssl context on the listening side), TLS 1.3.

python bench/peers/naive_ssl.py LISTEN_PORT BACKEND_HOST BACKEND_PORT CERT KEY
"""
import asyncio
import os
import ssl
import sys

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protocol_proxy import Client  # noqa: E402


async def main(port, bhost, bport, cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client((bhost, bport)), "127.0.0.1", port,
                                      backlog=4096, ssl=ctx)
    print("READY", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
