"""Ports picked for a daemon to bind later come from below the kernel's ephemeral range, where no
outgoing connection can take them between the pick and the bind."""

from __future__ import annotations

import socket

from aidc import polling


def test_a_picked_port_is_below_the_ephemeral_range_and_free_to_listen_on():
    low = polling._ephemeral_low()
    ports = {polling.free_port() for _ in range(20)}
    assert all(polling.LISTEN_PORTS_FROM <= p < low for p in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()


def test_a_port_something_listens_on_is_never_picked(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(polling, "LISTEN_PORTS_FROM", busy)
        monkeypatch.setattr(polling, "_ephemeral_low", lambda: busy + 1000)
        # Draws land on the busy port about once in a thousand; pin the draw to it first.
        draws = iter([busy, busy + 1])
        monkeypatch.setattr("random.randrange", lambda a, b: next(draws))
        assert polling.free_port() == busy + 1


def test_without_room_below_the_ephemeral_range_the_kernel_picks(monkeypatch):
    real_low = polling._ephemeral_low()
    monkeypatch.setattr(polling, "_ephemeral_low", lambda: polling.LISTEN_PORTS_FROM + 10)
    assert polling.free_port() >= real_low  # the kernel's pick is an ephemeral port


def test_an_unreadable_port_range_reads_as_linux_s_default(tmp_path):
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("garbage\n")
    assert polling._ephemeral_low(str(ranges)) == 32768
    assert polling._ephemeral_low(str(tmp_path / "absent")) == 32768
