"""The grpc.aio server on GRPC_PORT: the inference service and `grpc.health.v1.Health`, bounded as
the HTTP listener is (service/connections.py): a message is at most MAX_BODY_BYTES, metadata at most
MAX_HEADER_BYTES, connections at most MAX_CONNECTIONS and RPCs in progress as many (HTTP serves one
request per connection at a time), streams per connection bounded, a connection idle for
IDLE_TIMEOUT_SECONDS closed, and a client pinging more often than the server allows cut off."""
import asyncio
from collections.abc import AsyncIterator

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.connections import ConnectionLimits
from service.dataplane import DataPlane
from service.protocols.grpc.servicer import SERVICE, InferenceServicer, inference_service

STREAMS_PER_CONNECTION = 100  # gRPC's usual advice; each stream is at most one message in flight
MIN_PING_INTERVAL_MS = 10_000  # pings without data closer together count as strikes
PING_STRIKES = 2               # then the connection is closed (GOAWAY too_many_pings)
HEALTH_WATCH_SECONDS = 1.0


class Health(health_pb2_grpc.HealthServicer):
    """SERVING once the data plane is ready (every model loaded and warm), NOT_SERVING before that
    and while draining: what Kubernetes' `grpc:` probe asks."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def _status(self, service: str) -> int | None:
        if service not in ("", SERVICE):
            return None
        return health_pb2.HealthCheckResponse.SERVING if self.plane.ready() \
            else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, context):
        status = self._status(request.service)
        if status is None:
            await context.abort(aio.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self._status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_SECONDS)


def grpc_server(plane: DataPlane, limits: ConnectionLimits, name: str, version: str) -> aio.Server:
    """The server, its listener on HOST:GRPC_PORT added but not started."""
    settings = plane.settings
    server = aio.server(maximum_concurrent_rpcs=limits.max_connections, options=[
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", settings.max_body_bytes),
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_connection_idle_ms", int(settings.idle_timeout_seconds * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", PING_STRIKES),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.so_reuseport", 0),  # a port another process holds is an error, not shared
    ])
    server.add_generic_rpc_handlers((inference_service(InferenceServicer(plane, name, version)),))
    health_pb2_grpc.add_HealthServicer_to_server(Health(plane), server)
    server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    return server
