"""The closed rendezvous: one bound address, the job's secret on every connection.

Real sockets and real gloo groups between threads of this process; no Ray.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading

import psutil
import pytest
import torch
import torch.distributed as dist
from test_weight_sync import form_group, model_tensors, receive_all, run_ranks

from learner.weight_sender import WeightSender, weight_meta
from segr1.weightsync.rendezvous import (
    MAGIC,
    NONCE_BYTES,
    RendezvousRefused,
    RendezvousServer,
    RendezvousStore,
    new_secret,
)
from segr1.weightsync.weight_sync import join_group

SHORT = datetime.timedelta(seconds=5)
REFUSED = "refused this client: wrong or missing job secret"


def other_local_ipv4() -> str | None:
    """An address of this machine other than loopback, to knock on; None if it has none."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def listening(pid: int) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_the_server_listens_on_the_given_address_only():
    server = RendezvousServer("127.0.0.1", new_secret())
    try:
        assert server._listener.getsockname() == ("127.0.0.1", server.port)
        mine = {addr for addr in listening(os.getpid()) if addr[1] == server.port}
        assert mine == {("127.0.0.1", server.port)}  # not 0.0.0.0 or ::
        other = other_local_ipv4()
        if other is not None:  # the same port on the machine's other address is closed
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, server.port), timeout=5).close()
    finally:
        server.close()
    with pytest.raises(ConnectionError, match="cannot connect"):
        RendezvousStore("127.0.0.1", server.port, "any", SHORT)


def test_a_client_without_the_secret_is_refused_on_its_side():
    secret = new_secret()
    server = RendezvousServer("127.0.0.1", secret)
    try:
        for wrong in ("", new_secret(), secret[:-1]):
            with pytest.raises(RendezvousRefused, match=f"127.0.0.1:{server.port} {REFUSED}"):
                RendezvousStore("127.0.0.1", server.port, wrong, SHORT)
        with pytest.raises(dist.DistNetworkError):  # torch's own client, which knows no secret
            dist.TCPStore("127.0.0.1", server.port, None, False, datetime.timedelta(seconds=2))
        member = RendezvousStore("127.0.0.1", server.port, secret, SHORT)
        member.set("k", b"v")
        assert member.get("k") == b"v"
        assert server.refused >= 3
    finally:
        server.close()
    with pytest.raises(ValueError, match="must not be empty"):
        RendezvousServer("127.0.0.1", "")


def test_a_client_checks_that_the_server_holds_the_secret_too():
    """Whatever took over the port cannot pose as the job's store without the secret."""
    impostor = socket.create_server(("127.0.0.1", 0))
    port = impostor.getsockname()[1]

    def accept_anyone() -> None:
        conn, _ = impostor.accept()
        with conn:
            conn.sendall(MAGIC + os.urandom(NONCE_BYTES))
            conn.recv(64)
            conn.sendall(b"\x01" + os.urandom(32))  # "accepted", with a made-up proof

    thread = threading.Thread(target=accept_anyone, daemon=True)
    thread.start()
    with impostor, pytest.raises(RendezvousRefused, match="could not prove the job secret"):
        RendezvousStore("127.0.0.1", port, new_secret(), SHORT)
    thread.join(5)


def test_the_store_keeps_tcpstore_semantics():
    secret = new_secret()
    server = RendezvousServer("127.0.0.1", secret)
    try:
        a = RendezvousStore("127.0.0.1", server.port, secret, SHORT)
        inner = RendezvousStore("127.0.0.1", server.port, secret, SHORT)  # referenced: see its docstring
        b = dist.PrefixStore("p", inner)
        assert a.add("p/n", 2) == 2 and b.add("n", 3) == 5 and a.get("p/n") == b"5"
        assert b.compare_set("c", "", "first") == b"first"
        assert b.compare_set("c", "other", "second") == b"first"
        assert a.compare_set("p/c", "first", "second") == b"second"
        assert a.compare_set("missing", "x", "y") == b"x"  # TCPStore answers the expected value
        assert a.check(["p/n", "p/c"]) and not a.check(["p/n", "nope"])
        waited = threading.Thread(target=lambda: b.wait(["late"]))
        waited.start()
        a.set("p/late", "here")
        waited.join(5)
        assert not waited.is_alive()
        a.set_timeout(datetime.timedelta(milliseconds=300))
        with pytest.raises(dist.DistStoreError, match="timed out after 0.3 s waiting for keys never"):
            a.get("never")
        with pytest.raises(dist.DistStoreError, match="timed out after 0.2 s waiting for keys p/never"):
            b.wait(["never"], datetime.timedelta(milliseconds=200))
    finally:
        server.close()


def test_refused_clients_do_not_break_the_weight_group():
    """Intruders knock before and during the join; the group still forms and moves weights."""
    sender = WeightSender(bucket_bytes=1024)
    host, port = sender.address()
    with pytest.raises(RendezvousRefused, match=REFUSED):
        join_group(host, port, 1, 2, "gloo", secret=new_secret(), timeout_s=5)
    receivers = form_group(sender, 2)
    with pytest.raises(RendezvousRefused, match=REFUSED):  # the live group's store
        RendezvousStore(host, port, "", SHORT)
    tensors = model_tensors(seed=3)
    plan = sender.plan(weight_meta(tensors))
    results = run_ranks(
        [lambda: sender.send(iter(tensors), 1)] + [lambda g=g: receive_all(g, plan, 1) for g in receivers]
    )
    assert results[0].bytes == plan.total_bytes
    for received in results[1:]:
        assert all(torch.equal(received[n], t) for n, t in tensors)
