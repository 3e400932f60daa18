"""External runtime mode: finding the runtime by its connection, choosing what a reset kills, settings."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from lambdalet_agent.external import Endpoint, ancestors, find_peer_process, socket_inode, victims
from lambdalet_agent.settings import SettingsError, from_args

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
# 127.0.0.1:40000 -> 127.0.0.1:9001 (inode 555) and the agent's side of it (inode 556), as the kernel writes.
TCP = HEADER + (
    "   0: 0100007F:9C40 0100007F:2329 01 00000000:00000000 00:00000000 00000000  1000        0 555 1 0 20 4 30 10 -1\n"
    "   1: 0100007F:2329 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 556 1 0 20 4 30 10 -1\n"
)
# 10.244.0.7:40001 -> 10.244.0.7:9001 over an IPv6 socket (IPv4-mapped).
TCP6 = HEADER + (
    "   0: 0000000000000000FFFF00000700F40A:9C41 0000000000000000FFFF00000700F40A:2329 01 "
    "00000000:00000000 00:00000000 00000000  1000        0 777 1 0 20 4 30 10 -1\n"
)


def test_socket_inode_finds_the_runtime_side_of_the_connection() -> None:
    runtime, agent = Endpoint("127.0.0.1", 40000), Endpoint("127.0.0.1", 9001)
    assert socket_inode([TCP], runtime, agent) == 555
    assert socket_inode([TCP], agent, runtime) == 556
    assert socket_inode([TCP], Endpoint("127.0.0.1", 40001), agent) is None


def test_socket_inode_reads_ipv4_mapped_ipv6_entries() -> None:
    runtime, agent = Endpoint("10.244.0.7", 40001), Endpoint("::ffff:10.244.0.7", 9001)
    assert socket_inode([TCP, TCP6], runtime, agent) == 777


def test_find_peer_process_finds_the_owner_of_a_real_connection() -> None:
    # Both ends are in this process: the agent's own pid is never the answer, so nothing is found...
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            runtime_end = Endpoint(*client.getsockname())
            agent_end = Endpoint(*accepted.getsockname())
            assert find_peer_process(runtime_end, agent_end) is None
            # ...but the socket itself is found in the kernel's table.
            tables = [Path("/proc/net/tcp").read_text()]
            assert socket_inode(tables, runtime_end, agent_end) is not None


def test_a_reset_kills_the_runtime_session_and_nothing_else() -> None:
    sessions = {1: 1, 10: 10, 11: 10, 20: 20, 21: 20, 22: 20, 30: 30}
    # The agent is pid 11 in session 10; the runtime leads session 20 (21 and 22 are its children).
    assert victims(sessions, 20, own_pid=11, protected={10, 1}) == [20, 21, 22]
    # Never the agent's own session, never pid 1, never the agent's ancestors.
    assert victims(sessions, 10, own_pid=11, protected={10, 1}) == []
    assert victims(sessions, 1, own_pid=11, protected={1}) == []
    assert victims(sessions, 0, own_pid=11, protected=set()) == []
    assert victims({5: 20, 20: 20}, 20, own_pid=11, protected={5}) == [20]


def test_ancestors_walks_up_to_the_root() -> None:
    parents = {5: 4, 4: 1, 1: 0}
    assert ancestors(5, parents.get) == {4, 1}
    assert ancestors(7, parents.get) == set()


def test_external_runtime_flag_and_variable() -> None:
    by_flag = from_args(["--external-runtime", "--runtime-api-address", "10.244.0.7:9001"], {})
    assert by_flag.external_runtime
    assert by_flag.runtime is None  # no bootstrap, no runtime id, no handler needed
    assert (by_flag.runtime_api_host, by_flag.runtime_api_port) == ("10.244.0.7", 9001)
    assert from_args([], {"LAMBDALET_EXTERNAL_RUNTIME": "1"}).external_runtime
    assert not from_args(["--handler", "app.handler"], {}).external_runtime
    with pytest.raises(SettingsError, match="external-runtime"):
        from_args(["--external-runtime", "--", "python", "x.py"], {})
