"""A real REAPI server for tests and benches: BuildGrid in its own Python 3.13 venv.

- ``find_bgd()`` locates the venv ``.ci/install_buildgrid.sh`` builds
  (``$FASTMAT_BUILDGRID_VENV``, else ``~/.cache/fastmat-buildgrid-venv``);
- ``BuildGrid`` starts ``bgd server start CONFIG`` on 127.0.0.1 with an
  in-memory (LRU) CAS and stops it;
- ``Uploader`` stores blobs with BatchUpdateBlobs / ByteStream Write, never
  sending a message above 4 MiB;
- ``build_tree`` turns ``{path: content}`` into REAPI Directory messages;
- ``GrpcProxy`` is a real gRPC server that forwards to BuildGrid while counting
  calls, in-flight requests and blob fetches, optionally delaying or tampering;
- ``LatencyProxy`` is a loopback TCP proxy that delays every chunk.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from fastmat import proto
from fastmat.digest import Digest
from fastmat.remote import RemoteCAS
from tests.helpers import stop_process

MAX_MESSAGE = 4 * 1024 * 1024
_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_CAPS = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"

_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
grpc-server-options:
  grpc.max_receive_message_length: {max_message}
  grpc.max_send_message_length: {max_message}
instances:
  - name: "{instance}"
    storages:
      - !lru-storage &cas-storage
        size: {size}
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
thread-pool-size: 64
maximum-concurrent-rpcs: 256
"""


def venv_dir() -> Path:
    env = os.environ.get("FASTMAT_BUILDGRID_VENV")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "fastmat-buildgrid-venv"


def find_bgd() -> Path | None:
    """The ``bgd`` executable of the BuildGrid venv, or None when not installed."""
    bgd = venv_dir() / "bin" / "bgd"
    return bgd if os.access(bgd, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _channel(address: str) -> Any:
    opts = [
        ("grpc.max_receive_message_length", 64 * MAX_MESSAGE),
        ("grpc.max_send_message_length", 64 * MAX_MESSAGE),
    ]
    return grpc.insecure_channel(address, options=opts)


class BuildGrid:
    """``bgd server start`` on 127.0.0.1 with an in-memory CAS, as a child process."""

    def __init__(self, workdir: Path, *, instance: str = "", size: str = "4GB") -> None:
        bgd = find_bgd()
        if bgd is None:
            raise FileNotFoundError(f"BuildGrid not installed in {venv_dir()}")
        self.bgd = bgd
        self.workdir = workdir
        self.instance = instance
        self.size = size
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"grpc://{self.address}"

    def start(self, timeout_s: float = 120.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            config = self.workdir / "bgd.yml"
            config.write_text(
                _CONFIG.format(
                    port=self.port,
                    instance=self.instance,
                    size=self.size,
                    max_message=64 * MAX_MESSAGE,
                )
            )
            log = (self.workdir / "bgd.log").open("wb")
            self.proc = subprocess.Popen(
                [str(self.bgd), "server", "start", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
            log.close()
            if self._wait_ready(timeout_s):
                return
            self.stop()
        raise RuntimeError(f"BuildGrid did not start; log:\n{self.log()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        ch = _channel(self.address)
        caps = ch.unary_unary(
            _CAPS,
            request_serializer=proto.GetCapabilitiesRequest.SerializeToString,
            response_deserializer=proto.ServerCapabilities.FromString,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    return False
                try:
                    caps(proto.GetCapabilitiesRequest(instance_name=self.instance), timeout=2)
                    return True
                except grpc.RpcError:
                    time.sleep(0.2)
            return False
        finally:
            ch.close()

    def log(self) -> str:
        p = self.workdir / "bgd.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None


def build_tree(spec: Mapping[str, Any]) -> tuple[Digest, dict[Digest, bytes]]:
    """REAPI Directory messages for ``spec``: ``{"a/b": b"data"}`` a file,
    ``{"x": ("exec", b"..")}`` an executable, ``{"l": ("symlink", "target")}``,
    ``{"empty/": None}`` an empty directory. Returns (root digest, all blobs)."""
    tree: dict[str, Any] = {}
    blobs: dict[Digest, bytes] = {}
    for path, value in spec.items():
        parts = path.rstrip("/").split("/")
        node = tree
        for p in parts[:-1] if not path.endswith("/") else parts:
            node = node.setdefault(p, {})
        if not path.endswith("/"):
            node[parts[-1]] = value

    def store(data: bytes) -> Any:
        d = Digest.of(data)
        blobs[d] = data
        return proto.Digest(hash=d.hash, size_bytes=d.size_bytes)

    def encode(node: dict[str, Any]) -> Any:
        msg = proto.Directory()
        for name in sorted(node):
            v = node[name]
            if isinstance(v, dict):
                msg.directories.add(name=name, digest=encode(v))
            elif isinstance(v, tuple) and v[0] == "symlink":
                msg.symlinks.add(name=name, target=v[1])
            elif isinstance(v, tuple) and v[0] == "exec":
                msg.files.add(name=name, digest=store(v[1]), is_executable=True)
            else:
                msg.files.add(name=name, digest=store(v))
        return store(msg.SerializeToString(deterministic=True))

    root = encode(tree)
    return Digest(root.hash, root.size_bytes), blobs


def directory_digests(root: Digest, blobs: Mapping[Digest, bytes]) -> set[Digest]:
    """The digests of every Directory message of the tree under ``root``."""
    out = {root}
    stack = [root]
    while stack:
        msg = proto.Directory.FromString(blobs[stack.pop()])
        for c in msg.directories:
            d = Digest(c.digest.hash, c.digest.size_bytes)
            if d not in out:
                out.add(d)
                stack.append(d)
    return out


class Uploader:
    """Stores blobs on a REAPI server through ``RemoteCAS.upload`` (batches under the
    server's limit, ByteStream Write for large blobs)."""

    def __init__(self, address: str, instance: str = "") -> None:
        self.instance = instance
        self._remote = RemoteCAS(address, instance, timeout_s=120)

    def close(self) -> None:
        self._remote.close()

    def upload(self, blobs: Mapping[Digest, bytes]) -> None:
        self._remote.upload(blobs.items())


def _blob_digests(method: str, request: bytes) -> list[Digest]:
    if method.endswith("/BatchReadBlobs"):
        req = proto.BatchReadBlobsRequest.FromString(request)
        return [Digest(x.hash, x.size_bytes) for x in req.digests]
    if method.endswith("/Read"):
        parts = proto.ReadRequest.FromString(request).resource_name.split("/")
        i = parts.index("blobs")
        return [Digest(parts[i + 1], int(parts[i + 2]))]
    return []


class GrpcProxy:
    """A gRPC server on 127.0.0.1 forwarding every call to ``upstream`` as bytes.

    Counts calls per method, requests in flight (current / peak) and fetches per
    blob digest. ``delay_s`` delays each call before forwarding; blobs whose
    digest is in ``tamper`` come back with their first byte flipped.
    """

    def __init__(
        self,
        upstream: str,
        *,
        delay_s: float = 0.0,
        workers: int = 300,
        unimplemented: frozenset[str] = frozenset(),
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.upstream = _channel(upstream)
        self.delay_s = delay_s
        self.unimplemented = unimplemented  # method names answered UNIMPLEMENTED
        self.fail_next: list[grpc.StatusCode] = []  # the next calls fail with these codes
        self.break_streams = 0  # this many streams fail UNAVAILABLE after their first chunk
        self.read_offsets: list[int] = []  # read_offset of each ByteStream.Read
        self.tamper: set[Digest] = set()
        self.calls: Counter[str] = Counter()
        self.fetches: Counter[Digest] = Counter()
        self.inflight = 0
        self.peak_inflight = 0
        self._lock = threading.Lock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[
                ("grpc.max_receive_message_length", 64 * MAX_MESSAGE),
                ("grpc.max_send_message_length", 64 * MAX_MESSAGE),
            ],
            maximum_concurrent_rpcs=workers,
        )
        self.server.add_generic_rpc_handlers([_Handler(self)])
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:  # (private key PEM, certificate chain PEM)
            creds = grpc.ssl_server_credentials([tls])
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.scheme = "grpc" if tls is None else "grpcs"
        self.server.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None).wait()
        self.upstream.close()

    @contextlib.contextmanager
    def _track(self, method: str, request: bytes) -> Iterator[None]:
        with self._lock:
            self.calls[method.rsplit("/", 1)[-1]] += 1
            self.fetches.update(_blob_digests(method, request))
            self.inflight += 1
            self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            yield
        finally:
            with self._lock:
                self.inflight -= 1

    def _corrupt_batch(self, raw: bytes) -> bytes:
        resp = proto.BatchReadBlobsResponse.FromString(raw)
        for r in resp.responses:
            if Digest(r.digest.hash, r.digest.size_bytes) in self.tamper and r.data:
                r.data = bytes([r.data[0] ^ 0xFF]) + r.data[1:]
        out: bytes = resp.SerializeToString()
        return out


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, proxy: GrpcProxy) -> None:
        self.proxy = proxy

    def service(self, details: Any) -> Any:
        method: str = details.method
        p = self.proxy
        with p._lock:
            code = p.fail_next.pop(0) if p.fail_next else None
        if code is not None:

            def failing(request: bytes, context: Any) -> Any:
                p.calls[method.rsplit("/", 1)[-1]] += 1
                context.abort(code, "injected by the test proxy")

            if method.endswith(("/GetTree", "/Read")):
                return grpc.unary_stream_rpc_method_handler(failing)
            return grpc.unary_unary_rpc_method_handler(failing)
        if method.rsplit("/", 1)[-1] in p.unimplemented:

            def refuse(request: bytes, context: Any) -> Any:
                p.calls[method.rsplit("/", 1)[-1]] += 1
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "disabled by the test proxy")

            if method.endswith(("/GetTree", "/Read")):
                return grpc.unary_stream_rpc_method_handler(refuse)
            return grpc.unary_unary_rpc_method_handler(refuse)
        if method.endswith(("/GetTree", "/Read")):
            up_stream = p.upstream.unary_stream(method)

            def stream(request: bytes, context: Any) -> Iterator[bytes]:
                with p._track(method, request):
                    tampered = set(_blob_digests(method, request)) & p.tamper
                    try:
                        first = True
                        if method.endswith("/Read"):
                            offset = proto.ReadRequest.FromString(request).read_offset
                            p.read_offsets.append(offset)
                        for chunk in up_stream(request, timeout=300):
                            if not first and p.break_streams > 0:
                                p.break_streams -= 1
                                context.abort(grpc.StatusCode.UNAVAILABLE, "stream broken")
                            out = chunk
                            if tampered and first and method.endswith("/Read"):
                                msg = proto.ReadResponse.FromString(chunk)
                                msg.data = bytes([msg.data[0] ^ 0xFF]) + msg.data[1:]
                                out = msg.SerializeToString()
                            first = False
                            yield out
                    except grpc.RpcError as e:
                        context.abort(e.code(), e.details())

            return grpc.unary_stream_rpc_method_handler(stream)
        up_unary = p.upstream.unary_unary(method)

        def unary(request: bytes, context: Any) -> bytes:
            with p._track(method, request):
                try:
                    resp: bytes = up_unary(request, timeout=300)
                except grpc.RpcError as e:
                    context.abort(e.code(), e.details())
                if p.tamper and method.endswith("/BatchReadBlobs"):
                    return p._corrupt_batch(resp)
                return resp

        return grpc.unary_unary_rpc_method_handler(unary)


class LatencyProxy:
    """A loopback TCP proxy delaying every chunk it forwards by ``delay_s``."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self._stop = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()


_shared: BuildGrid | None = None


def shared_buildgrid() -> BuildGrid:
    """One BuildGrid for the whole test session (stopped at exit); skips when absent."""
    global _shared  # noqa: PLW0603 - one server per process, shared by test modules
    if find_bgd() is None:
        pytest.skip(
            f"BuildGrid is not installed in {venv_dir()} "
            "(run .ci/install_buildgrid.sh or set FASTMAT_BUILDGRID_VENV)"
        )
    if _shared is None:
        server = BuildGrid(Path(tempfile.mkdtemp(prefix="fastmat-bgd-")))
        server.start()
        atexit.register(server.stop)
        _shared = server
    return _shared


@pytest.fixture
def buildgrid() -> BuildGrid:
    """The session's BuildGrid server (import this fixture into a test module)."""
    return shared_buildgrid()
