"""The test cluster itself, and the allocation checks every runtime shares."""

from __future__ import annotations

import pytest

from .conftest import Driver
from .slurm import SlurmCluster

pytestmark = pytest.mark.timeout(120)


def test_nodes_are_separate_hosts(slurm: SlurmCluster) -> None:
    res = slurm.run(
        ["srun", "-N3", "bash", "-c", 'echo "$SLURMD_NODENAME $(hostname -I)"']
    )
    assert res.returncode == 0, res.stderr
    seen = dict(line.split() for line in res.stdout.splitlines())
    assert seen == slurm.addresses


def test_a_node_cannot_reach_the_login_node_at_loopback(slurm: SlurmCluster) -> None:
    """What makes a runtime's local default (127.0.0.1) fail here as on a cluster."""
    probe = (
        "import socket, sys\n"
        "s = socket.create_server((sys.argv[1], 0)); port = s.getsockname()[1]\n"
        "print(port, flush=True); s.settimeout(60); s.accept()\n"
    )
    py = "python3"
    server = slurm.popen([py, "-c", probe, "127.0.0.1"], stdout=-1)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        res = slurm.run(
            ["srun", "-N1", "-w", "n1", py, "-c",
             f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"],
        )  # fmt: skip
        assert res.returncode != 0
        assert "ConnectionRefused" in res.stderr
    finally:
        server.kill()
        server.communicate()


@pytest.mark.parametrize(
    ("allocation", "reason"),
    [
        ({"nodes": 5}, "Requested node configuration is not available"),
        ({"queue": "nope"}, "invalid partition"),
        ({"gpus_per_node": 1}, "Invalid generic resource"),
    ],
)
def test_preflight_gives_the_scheduler_reason(
    driver: Driver, allocation: dict[str, object], reason: str
) -> None:
    out = driver(
        f"""
        import json
        from asyncflow.errors import BackendStartError
        from asyncflow.hpc import Allocation
        from asyncflow.slurm import preflight
        alloc, _ = Allocation.from_mapping(
            {{"resource": "slurm", **{allocation!r}}}, "test"
        )
        try:
            preflight(alloc, "test")
        except BackendStartError as exc:
            print(json.dumps({{"error": str(exc)}}))
        """
    )
    assert reason in out["error"]


def test_driver_address_is_the_login_nodes(driver: Driver, slurm: SlurmCluster) -> None:
    out = driver(
        """
        import json
        from asyncflow.hpc import Allocation
        from asyncflow.slurm import driver_address, preflight
        alloc, _ = Allocation.from_mapping({"resource": "slurm", "nodes": 3}, "t")
        preflight(alloc, "t")
        print(json.dumps({"address": driver_address()}))
        """
    )
    assert out["address"] == slurm.login_address
