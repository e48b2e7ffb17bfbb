"""Muster's gRPC API driven by grpcio, Python's gRPC implementation, with stubs
generated from proto/ by grpcio-tools: registration through a follower,
read-your-writes on another node, a watch replaying and following changes, a lease
kept alive over a stream, a bad request refused naming its field, and the registry
reached through `muster gateway` by the `muster-service` header.

Usage: py_grpc_check.py PROTO_DIR FOLLOWER OTHER_NODE GATEWAY GATEWAY_SERVICE [CA_FILE]
(addresses as host:port; GATEWAY "-" skips the gateway's part). With CA_FILE the
client speaks TLS to the nodes and trusts that CA (nodes started with --tls-cert).
Prints "grpcio: all checks passed" at the end.
"""

import importlib.resources
import queue
import sys
import tempfile
import threading

import grpc
from grpc_tools import protoc

TIMEOUT = 10.0


def generate_stubs(proto_dir):
    """Compiles registry.proto into a temporary package and imports it."""
    out = tempfile.mkdtemp(prefix="muster-py-stubs-")
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "muster/v1/registry.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {proto_dir}/muster/v1/registry.proto")
    sys.path.insert(0, out)
    from muster.v1 import registry_pb2, registry_pb2_grpc  # noqa: E402

    return registry_pb2, registry_pb2_grpc


def check(condition, what):
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def refused(what, call, code, text):
    """Checks that `call` fails with `code` and a message containing `text`."""
    try:
        call()
    except grpc.RpcError as e:
        check(e.code() == code and text in e.details(), f"{what} is refused as {code.name} ({e.details()!r})")
        return
    raise SystemExit(f"FAILED: {what} was answered")


def main():
    proto_dir, follower, other, gateway, gateway_service = sys.argv[1:6]
    ca_file = sys.argv[6] if len(sys.argv) > 6 else None
    pb, rpc = generate_stubs(proto_dir)

    def node_channel(addr):
        if ca_file is None:
            return grpc.insecure_channel(addr)
        with open(ca_file, "rb") as f:
            return grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=f.read()))

    registry = rpc.RegistryStub(node_channel(follower))
    elsewhere = rpc.RegistryStub(node_channel(other))

    def instance(instance_id, port):
        return pb.Instance(
            service="py-orders",
            instance_id=instance_id,
            address="10.1.0.7",
            port=port,
            tags=["python"],
            metadata={"client": "grpcio"},
        )

    # Written through a follower (forwarded to the leader), read on another node at
    # the revision the write returned.
    first = registry.Register(pb.RegisterRequest(instance=instance("py-1", 8080)), timeout=TIMEOUT)
    revision = first.header.revision
    check(revision > 0 and first.instance.create_revision == revision, "a registration returns its revision")
    found = elsewhere.Discover(
        pb.DiscoverRequest(service="py-orders", mode=pb.READ_MODE_MIN_REVISION, min_revision=revision),
        timeout=TIMEOUT,
    )
    check(
        [(i.instance_id, i.port, dict(i.metadata)) for i in found.instances]
        == [("py-1", 8080, {"client": "grpcio"})],
        "another node reads the write at its revision",
    )
    check(found.header.revision >= revision, "the read is at least at the write's revision")

    # A watch from the write's revision replays it, then follows new changes.
    events = queue.Queue()
    watch = registry.Watch(pb.WatchRequest(service="py-orders", start_revision=revision))

    def follow():
        try:
            for message in watch:
                events.put(message)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                events.put(e)

    threading.Thread(target=follow, daemon=True).start()

    def next_event():
        while True:
            message = events.get(timeout=TIMEOUT)
            if isinstance(message, Exception):
                raise SystemExit(f"FAILED: the watch broke: {message}")
            if message.WhichOneof("response") != "progress":
                return message

    replayed = next_event()
    check(
        replayed.WhichOneof("response") == "event"
        and replayed.event.revision == revision
        and replayed.event.put.instance_id == "py-1",
        "the watch replays the registration",
    )
    second = elsewhere.Register(pb.RegisterRequest(instance=instance("py-2", 8081)), timeout=TIMEOUT)
    followed = next_event()
    check(
        followed.event.put.instance_id == "py-2" and followed.event.revision == second.header.revision,
        "the watch follows a registration made on another node",
    )

    # A lease kept alive over the bidirectional stream.
    lease = registry.GrantLease(pb.GrantLeaseRequest(ttl_ms=5000), timeout=TIMEOUT)
    check(lease.lease_id > 0 and lease.ttl_ms == 5000, "a lease is granted")
    answers = registry.KeepAlive(iter([pb.KeepAliveRequest(lease_id=lease.lease_id)] * 3), timeout=TIMEOUT)
    kept = [a.ttl_ms for a in answers]
    check(kept == [5000, 5000, 5000], "each keep-alive renews the lease's full TTL")
    registry.RevokeLease(pb.RevokeLeaseRequest(lease_id=lease.lease_id), timeout=TIMEOUT)

    # A bad request is refused, naming the field.
    refused(
        "an invalid service name",
        lambda: registry.Register(
            pb.RegisterRequest(instance=pb.Instance(service="Bad_Name", instance_id="x", address="10.0.0.1", port=1)),
            timeout=TIMEOUT,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "service",
    )

    # A deregistration reaches the watch as a delete.
    registry.Deregister(pb.DeregisterRequest(service="py-orders", instance_id="py-1"), timeout=TIMEOUT)
    deleted = next_event()
    check(
        deleted.event.WhichOneof("kind") == "delete"
        and deleted.event.delete.key.instance_id == "py-1"
        and deleted.event.delete.reason == pb.DELETE_REASON_DEREGISTERED,
        "the watch reports the deregistration",
    )
    watch.cancel()

    if gateway == "-":
        print("grpcio: all checks passed")
        return

    # Through the gateway: the registry itself is the service behind it.
    via_gateway = rpc.RegistryStub(grpc.insecure_channel(gateway))
    routed = via_gateway.Discover(
        pb.DiscoverRequest(service="py-orders", mode=pb.READ_MODE_LINEARIZABLE),
        metadata=[("muster-service", gateway_service)],
        timeout=TIMEOUT,
    )
    check([i.instance_id for i in routed.instances] == ["py-2"], "a call through the gateway is answered")
    refused(
        "a call through the gateway to a service with no instance",
        lambda: via_gateway.Discover(
            pb.DiscoverRequest(service="py-orders"),
            metadata=[("muster-service", "nothing-here")],
            timeout=TIMEOUT,
        ),
        grpc.StatusCode.UNAVAILABLE,
        "nothing-here",
    )
    print("grpcio: all checks passed")


if __name__ == "__main__":
    main()
