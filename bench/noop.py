"""A no-op Ingest server: the bound `lenpred bench sidecar` compares the sidecar with.

Same port layout and message types as the sidecar (lenpred.v1 and lenpred.v2 Ingest, same
message size limit); each message is parsed (as the sidecar's deserializer does) and acked with
its row count, nothing else. `--processes N` runs N of them on one port (SO_REUSEPORT), like
`lenpred sidecar --processes N`.

    python -m lenpred.bench.noop --port 50099 [--processes N]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v2 import lenpred_pb2 as pb2


async def _v1(request_iterator, context):
    async for b in request_iterator:
        yield pb.IngestAck(seq=b.seq, accepted=len(b.prefill.rids) + len(b.decode.rids) + len(b.finished))


async def _v2(request_iterator, context):
    async for b in request_iterator:
        yield pb2.Ack(seq=b.seq, accepted=(len(b.prefill_handles) + len(b.decode_handles) + len(b.finished_handles)) // 4)


async def serve(host: str, port: int, reuse: bool, max_bytes: int = 64 << 20) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_bytes),
                                      ("grpc.so_reuseport", int(reuse))])
    for name, fn, req, resp in (("lenpred.v1.LengthPredictor", _v1, pb.IngestBatch, pb.IngestAck),
                                ("lenpred.v2.LengthPredictor", _v2, pb2.Batch, pb2.Ack)):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {
            "Ingest": grpc.stream_stream_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                            response_serializer=resp.SerializeToString)}),))
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise SystemExit(f"could not bind {host}:{port}")
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def _run(host: str, port: int, reuse: bool) -> None:
    try:
        asyncio.run(serve(host, port, reuse))
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lenpred.bench.noop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--processes", type=int, default=1)
    a = ap.parse_args(argv)
    if a.processes <= 1:
        _run(a.host, a.port, False)
        return 0
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(a.host, a.port, True)) for _ in range(a.processes)]
    for p in procs:
        p.start()
    signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])
    for p in procs:
        p.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
