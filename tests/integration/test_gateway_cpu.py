"""Opt-in CPU in proportion to memory for local environments: each environment runs in its own CPU
cgroup with memoryMB/1769 of a CPU, the kernel throttles a busy function, and nothing is left behind."""

from __future__ import annotations

import json
from pathlib import Path

from gateway_support import running_gateway, write_function
from lambdalet_gateway.cpu import CpuCgroups, quota_us

SPIN = """
import time

def handler(event, context):
    end = time.time() + event["seconds"]
    while time.time() < end:
        pass
    with open("/proc/self/cgroup") as f:
        return {"cgroups": f.read().splitlines()}
"""


def test_environments_get_a_cpu_share_in_proportion_to_memory(tmp_path: Path) -> None:
    probe = CpuCgroups.detect()
    probe.close()
    write_function(tmp_path, "spin", {"app.py": SPIN}, memoryMB=256, timeoutSeconds=10)
    with running_gateway([tmp_path], tmp_path, cpu_limits=True) as gateway:
        status, _, body = gateway.invoke("spin", {"seconds": 0.6})
        assert status == 200
        cgroups = json.loads(body)["cgroups"]
        if probe.parent is None:
            # this machine lets no process create cgroups: environments run uncapped, and still run
            return
        parent = probe.parent.name.rsplit("-", 1)[0]
        ours = [line for line in cgroups if parent in line]
        assert ours, cgroups
        relative = ours[0].split(":", 2)[2]
        root = Path("/sys/fs/cgroup/cpu") if probe.version == 1 else Path("/sys/fs/cgroup")
        env_cgroup = root / relative.lstrip("/")
        if probe.version == 1:
            assert int((env_cgroup / "cpu.cfs_quota_us").read_text()) == quota_us(256) == 14471
            stat = dict(line.split() for line in (env_cgroup / "cpu.stat").read_text().splitlines())
        else:
            assert (env_cgroup / "cpu.max").read_text().split() == [str(quota_us(256)), "100000"]
            stat = dict(line.split() for line in (env_cgroup / "cpu.stat").read_text().splitlines())
        assert int(stat["nr_throttled"]) > 0
    assert not env_cgroup.exists()
    assert not env_cgroup.parent.exists()
