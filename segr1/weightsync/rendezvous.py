"""A closed rendezvous: the key-value store a process group forms through, bound to one address
and open only to members that prove the job's secret.

Why not ``torch.distributed.TCPStore``: it listens on every interface whatever host it is given,
and it has no authentication. The keys a group forms from are the addresses of every rank's gloo
or NCCL endpoint, so anyone who reaches the port can join the group or break it.

``RendezvousServer`` binds one explicit address at a port the OS picks (no free-port race). Every
connection starts with an HMAC-SHA256 challenge-response over the per-job secret, both ways: the
client proves it holds the secret before its first request, and the server proves it back, so a
client also knows it reached this job's store and not whatever took over the port. A client
without the secret gets ``RendezvousRefused`` on its side; the server drops that connection and
goes on serving the others. The secret itself never crosses the wire.

``RendezvousStore`` is the client: a ``torch.distributed.Store`` written in Python, which
``PrefixStore``, ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` and ``init_process_group(store=...)``
take like any C++ store. It implements what forming a group uses (set, get, add, compare_set,
wait, check); torch builds multi_get, multi_set and append on top of these.

Only the store is authenticated: the data connections gloo or NCCL then open between ranks are
not, so a cluster still needs a private network (docs/cluster.md). Pure Python + torch, no Ray.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import secrets
import socket
import struct
import threading

import torch.distributed as dist

log = logging.getLogger("segr1")

MAGIC = b"segr1-rendezvous-1"  # the server's greeting, so a client of another protocol fails fast
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
HANDSHAKE_TIMEOUT_S = 10.0  # a connection that has not proven the secret by then is dropped
ACCEPTED = b"\x01"
REFUSED = b"\x00"
OK, TIMED_OUT, FAILED = b"ok", b"timeout", b"error"


def new_secret() -> str:
    """A fresh per-job secret (256 bits, hex). Pass it through Ray calls, never env or logs."""
    return secrets.token_hex(32)


class RendezvousRefused(ConnectionError):
    """The rendezvous and this client do not share the job secret (or speak another protocol)."""


def _proof(secret: str, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """Who holds ``secret`` can compute this; the nonces make every connection's proof new."""
    return hmac.new(secret.encode(), role + server_nonce + client_nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the other end closed the connection")
        data += chunk
    return bytes(data)


def _send_message(sock: socket.socket, parts: list[bytes]) -> None:
    """A message is a count of parts, then each part with its length (all big-endian uint32)."""
    sock.sendall(b"".join([struct.pack("!I", len(parts))] + [struct.pack("!I", len(p)) + p for p in parts]))


def _recv_message(sock: socket.socket) -> list[bytes]:
    (count,) = struct.unpack("!I", _recv_exact(sock, 4))
    parts = []
    for _ in range(count):
        (size,) = struct.unpack("!I", _recv_exact(sock, 4))
        parts.append(_recv_exact(sock, size))
    return parts


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class RendezvousServer:
    """Serves one store on ``host`` (that address only) at ``self.port``, to holders of ``secret``.

    Serving runs in daemon threads of this process and lasts until ``close``: keep the server as
    long as the group that formed through it, since later groups built on a default group
    (``new_group``) meet through its store too.
    """

    def __init__(self, host: str, secret: str) -> None:
        if not secret:
            raise ValueError("RendezvousServer: the job secret must not be empty")
        self.host = host
        self._secret = secret
        self._data: dict[bytes, bytes] = {}
        self._changed = threading.Condition()
        self._connections: set[socket.socket] = set()
        self.refused = 0  # connections turned away: wrong secret, another protocol, or silence
        try:
            self._listener = socket.create_server((host, 0), family=_family(host))
        except OSError as exc:
            raise OSError(f"rendezvous: cannot listen on {host!r}: {exc}") from exc
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, name=f"rendezvous-{self.port}", daemon=True).start()

    def close(self) -> None:
        """Stop listening and drop every connection (their clients' next request fails)."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone does not
        except OSError:  # closed before
            pass
        self._listener.close()
        with self._changed:
            connections, self._connections = self._connections, set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:  # already gone
                pass

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        with conn:
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                admitted = self._admit(conn)
            except OSError:  # left, or said nothing in time
                admitted = False
            if not admitted:
                with self._changed:
                    self.refused += 1
                log.warning("rendezvous at %s:%d refused %s:%d: it did not prove the job secret",
                            self.host, self.port, peer[0], peer[1])
                return
            conn.settimeout(None)
            with self._changed:
                self._connections.add(conn)
            try:
                while True:
                    _send_message(conn, self._handle(_recv_message(conn)))
            except (OSError, struct.error, ValueError, IndexError):  # the client left or spoke nonsense
                pass
            finally:
                with self._changed:
                    self._connections.discard(conn)

    def _admit(self, conn: socket.socket) -> bool:
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        conn.sendall(MAGIC + server_nonce)
        client_nonce = _recv_exact(conn, NONCE_BYTES)
        claimed = _recv_exact(conn, PROOF_BYTES)
        if not hmac.compare_digest(claimed, _proof(self._secret, b"client", server_nonce, client_nonce)):
            conn.sendall(REFUSED)
            return False
        conn.sendall(ACCEPTED + _proof(self._secret, b"server", server_nonce, client_nonce))
        return True

    def _has(self, keys: list[bytes]) -> bool:
        return all(k in self._data for k in keys)

    def _handle(self, request: list[bytes]) -> list[bytes]:
        """One request, with TCPStore's semantics (``add`` keeps decimal text, as TCPStore does)."""
        op, *args = request
        with self._changed:
            if op == b"set":
                key, value = args
                self._data[key] = value
                self._changed.notify_all()
                return [OK]
            if op in (b"get", b"wait"):  # args: timeout in ms, then the keys
                timeout_s = int(args[0]) / 1000
                if not self._changed.wait_for(lambda: self._has(args[1:]), timeout_s):
                    return [TIMED_OUT]
                return [OK, self._data[args[1]]] if op == b"get" else [OK]
            if op == b"add":
                key, amount = args
                value = int(self._data.get(key, b"0")) + int(amount)
                self._data[key] = str(value).encode()
                self._changed.notify_all()
                return [OK, self._data[key]]
            if op == b"compare_set":
                key, expected, desired = args
                current = self._data.get(key)
                if (current is None and expected == b"") or current == expected:
                    self._data[key] = current = desired
                    self._changed.notify_all()
                return [OK, expected if current is None else current]
            if op == b"check":
                return [OK, b"1" if self._has(args) else b"0"]
        return [FAILED, b"unknown request " + op[:32]]


class RendezvousStore(dist.Store):
    """A ``torch.distributed.Store`` served by the ``RendezvousServer`` at ``host:port``.

    Connecting proves ``secret``; a server that does not know it refuses with
    ``RendezvousRefused``. Requests share one connection, one at a time. ``get`` and ``wait``
    block until their keys exist, up to the store's timeout (``set_timeout`` changes it).

    Keep a Python reference for as long as a group uses the store: torch holds only its C++
    half, and once the Python object is collected its methods are gone ("Tried to call pure
    virtual function").
    """

    def __init__(self, host: str, port: int, secret: str, timeout: datetime.timedelta) -> None:
        super().__init__()
        self.set_timeout(timeout)
        self.address = f"{host}:{port}"
        self._lock = threading.Lock()
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=HANDSHAKE_TIMEOUT_S)
        except OSError as exc:
            raise ConnectionError(f"rendezvous at {self.address}: cannot connect: {exc}") from exc
        try:
            self._handshake(secret)
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(None)  # a blocking get waits on the server, which bounds it

    def _handshake(self, secret: str) -> None:
        try:
            greeting = _recv_exact(self._sock, len(MAGIC) + NONCE_BYTES)
        except OSError as exc:
            raise RendezvousRefused(f"rendezvous at {self.address} sent no greeting: {exc}") from exc
        if not greeting.startswith(MAGIC):
            raise RendezvousRefused(f"{self.address} is not a segr1 rendezvous (it speaks another protocol)")
        server_nonce, client_nonce = greeting[len(MAGIC):], secrets.token_bytes(NONCE_BYTES)
        self._sock.sendall(client_nonce + _proof(secret, b"client", server_nonce, client_nonce))
        try:
            verdict = _recv_exact(self._sock, 1)
        except OSError:
            verdict = REFUSED
        if verdict != ACCEPTED:
            raise RendezvousRefused(f"rendezvous at {self.address} refused this client: wrong or missing job secret")
        server_proof = _recv_exact(self._sock, PROOF_BYTES)
        if not hmac.compare_digest(server_proof, _proof(secret, b"server", server_nonce, client_nonce)):
            raise RendezvousRefused(
                f"rendezvous at {self.address} could not prove the job secret: not this job's store"
            )

    def _call(self, op: bytes, *args: bytes) -> list[bytes]:
        with self._lock:
            try:
                _send_message(self._sock, [op, *args])
                status, *reply = _recv_message(self._sock)
            except OSError as exc:
                raise dist.DistNetworkError(f"rendezvous at {self.address}: connection lost: {exc}") from exc
        if status == TIMED_OUT:  # only get and wait time out: args are the timeout, then the keys
            keys = ", ".join(k.decode(errors="replace") for k in args[1:])
            raise dist.DistStoreError(
                f"rendezvous at {self.address}: timed out after {int(args[0]) / 1000:g} s waiting for keys {keys}"
            )
        if status != OK:
            raise dist.DistStoreError(f"rendezvous at {self.address}: {b' '.join(reply).decode(errors='replace')}")
        return reply

    def _timeout_ms(self, timeout: datetime.timedelta | None) -> bytes:
        return str(int((self.timeout if timeout is None else timeout).total_seconds() * 1000)).encode()

    @staticmethod
    def _bytes(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode()

    def set(self, key: str, value: str | bytes) -> None:
        self._call(b"set", key.encode(), self._bytes(value))

    def get(self, key: str) -> bytes:
        return self._call(b"get", self._timeout_ms(None), key.encode())[0]

    def add(self, key: str, amount: int) -> int:
        return int(self._call(b"add", key.encode(), str(int(amount)).encode())[0])

    def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
        return self._call(b"compare_set", key.encode(), self._bytes(expected_value), self._bytes(desired_value))[0]

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        self._call(b"wait", self._timeout_ms(timeout), *(k.encode() for k in keys))

    def check(self, keys: list[str]) -> bool:
        return self._call(b"check", *(k.encode() for k in keys))[0] == b"1"
