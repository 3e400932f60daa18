"""The cgroup v2 memory limit, on a fake cgroup file system in tmp_path (this machine's memory controller
is on cgroup v1): finding the agent's cgroup, the decisions to use it, move the agent into a leaf or fall
back, the limits written, peak and OOM accounting, killing, undoing the setup, and the v2 -> v1 -> rlimit
order of ``create_limiter``.

A fake tree cannot create interface files on ``mkdir`` as the kernel does, so each test lays out the
child cgroup's files the kernel would create (or leaves them out to stand for a kernel that would not).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lambdalet_agent import memory
from lambdalet_agent.memory import (
    MIB,
    CgroupUnavailable,
    CgroupV2Limiter,
    RlimitLimiter,
    cgroup_v2_dir,
    create_limiter,
)

PID = os.getpid()
EVENTS = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {oom}\noom_group_kill 0\n"


@dataclass
class Tree:
    proc: Path
    own: Path

    @property
    def child(self) -> Path:
        return self.own / f"lambdalet-{PID}"

    @property
    def leaf(self) -> Path:
        return self.own / f"lambdalet-{PID}-agent"

    def kernel_child(self, *, peak: bool = True, kill: bool = True, swap: bool = True) -> None:
        """The files the kernel creates in a child cgroup once ``memory`` is in the parent's subtree_control."""
        child = self.child
        child.mkdir()
        files = {
            "cgroup.procs": "",
            "memory.max": "max\n",
            "memory.oom.group": "0\n",
            "memory.events": EVENTS.format(max=0, oom=0),
        }
        if swap:
            files["memory.swap.max"] = "max\n"
        if peak:
            files["memory.peak"] = "0\n"
        if kill:
            files["cgroup.kill"] = ""
        for name, text in files.items():
            (child / name).write_text(text)


def make_tree(
    tmp_path: Path,
    *,
    controllers: str = "cpuset cpu io memory pids",
    subtree: str = "",
    procs: tuple[int, ...] = (PID,),
    root: bool = False,
    cgroup_line: str = "0::/kubepods/pod-a/c1",
    mount_root: str = "/",
) -> Tree:
    proc = tmp_path / "proc"
    proc.mkdir()
    mount = tmp_path / "sys fs" / "cgroup"  # a space, escaped as \040 in mountinfo
    (proc / "cgroup").write_text(f"{cgroup_line}\n")
    escaped = str(mount).replace(" ", "\\040")
    (proc / "mountinfo").write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        f"31 23 0:28 {mount_root} {escaped} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    own = mount / cgroup_line[3:].removeprefix(mount_root.rstrip("/")).lstrip("/")
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.subtree_control").write_text(subtree + "\n")
    (own / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
    if not root:
        (own / "cgroup.type").write_text("domain\n")
    return Tree(proc, own)


# ------------------------------------------------------------------------------------ finding the cgroup


def test_own_cgroup_is_found_under_the_cgroup2_mount(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    assert cgroup_v2_dir(tree.proc) == tree.own


def test_a_mount_of_a_subtree_is_followed(tmp_path: Path) -> None:
    """A container's cgroup2 mount may show the hierarchy from its own cgroup down (mountinfo root field)."""
    tree = make_tree(tmp_path, mount_root="/kubepods")
    assert cgroup_v2_dir(tree.proc) == tmp_path / "sys fs" / "cgroup" / "pod-a" / "c1"


def test_hybrid_hosts_without_a_v2_line_or_mount_are_reported(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, cgroup_line="4:memory:/x")
    with pytest.raises(CgroupUnavailable, match="no 0:: line"):
        cgroup_v2_dir(tree.proc)
    (tree.proc / "cgroup").write_text("0::/somewhere\n")
    (tree.proc / "mountinfo").write_text("35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    with pytest.raises(CgroupUnavailable, match="no cgroup2 mount"):
        cgroup_v2_dir(tree.proc)


# ------------------------------------------------------------------------------------ setting up


def test_agent_alone_in_its_cgroup_moves_to_a_leaf_and_limits_a_child(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    tree.kernel_child()
    limiter = CgroupV2Limiter(256, tree.own)
    # No processes in a cgroup that delegates: the agent went into a leaf sibling first, then +memory.
    assert (tree.leaf / "cgroup.procs").read_text() == str(PID)
    assert (tree.own / "cgroup.subtree_control").read_text() == "+memory"
    assert (tree.child / "memory.max").read_text() == str(256 * MIB)
    assert (tree.child / "memory.swap.max").read_text() == "0"
    assert (tree.child / "memory.oom.group").read_text() == "1"
    assert limiter.mechanism == "cgroup-v2"
    limiter.close()
    # Undone: memory no longer delegated, the agent back in its own cgroup (the leaf's rmdir works only on
    # a real cgroupfs, where the interface files inside do not count).
    assert (tree.own / "cgroup.subtree_control").read_text() == "-memory"
    assert (tree.own / "cgroup.procs").read_text() == str(PID)


def test_swap_limit_is_skipped_where_swap_accounting_is_off(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    tree.kernel_child(swap=False)
    limiter = CgroupV2Limiter(128, tree.own)
    assert (tree.child / "memory.max").read_text() == str(128 * MIB)
    assert not (tree.child / "memory.swap.max").exists()
    limiter.close()


def test_other_processes_in_the_cgroup_mean_falling_back_untouched(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, procs=(1, PID))
    tree.kernel_child()
    with pytest.raises(CgroupUnavailable, match="1 other process"):
        CgroupV2Limiter(128, tree.own)
    assert (tree.own / "cgroup.subtree_control").read_text() == "\n"
    assert not tree.leaf.exists()
    assert (tree.child / "memory.max").read_text() == "max\n"


def test_the_root_cgroup_may_keep_the_agent(tmp_path: Path) -> None:
    """The root cgroup (no cgroup.type file) is exempt from the no-internal-processes rule."""
    tree = make_tree(tmp_path, root=True, procs=(1, PID), cgroup_line="0::/")
    tree.kernel_child()
    limiter = CgroupV2Limiter(128, tree.own)
    assert not tree.leaf.exists()
    assert (tree.own / "cgroup.subtree_control").read_text() == "+memory"
    limiter.close()


def test_memory_already_delegated_is_used_and_left_as_it_was(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, subtree="cpu memory", procs=())
    tree.kernel_child()
    limiter = CgroupV2Limiter(128, tree.own)
    limiter.close()
    assert (tree.own / "cgroup.subtree_control").read_text() == "cpu memory\n"
    assert not tree.leaf.exists()


def test_memory_controller_not_delegated_by_the_parent(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, controllers="cpu pids")
    with pytest.raises(CgroupUnavailable, match="not delegated"):
        CgroupV2Limiter(128, tree.own)
    assert not tree.leaf.exists()


def test_a_child_without_memory_files_is_given_up_and_the_setup_undone(tmp_path: Path) -> None:
    """The kernel did not enable memory for the children (no memory.max): back out of every step."""
    tree = make_tree(tmp_path)
    with pytest.raises(CgroupUnavailable, match="not enabled for the children"):
        CgroupV2Limiter(128, tree.own)
    assert not tree.child.exists()
    assert (tree.own / "cgroup.subtree_control").read_text() == "-memory"
    assert (tree.own / "cgroup.procs").read_text() == str(PID)


def test_a_failing_cgroup_file_falls_back_with_the_reason(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    (tree.own / "cgroup.subtree_control").unlink()
    (tree.own / "cgroup.subtree_control").mkdir()  # reading and writing it fail with an OSError
    with pytest.raises(CgroupUnavailable, match="cannot set up a memory cgroup"):
        CgroupV2Limiter(128, tree.own)


# ------------------------------------------------------------------------------------ measuring, killing


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_peak_is_the_cgroup_watermark_reset_per_invocation(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    tree = make_tree(tmp_path)
    tree.kernel_child()
    limiter = CgroupV2Limiter(512, tree.own)
    assert limiter.peak_resettable
    limiter.attach(sleeper.pid)
    assert (tree.child / "cgroup.procs").read_text() == str(sleeper.pid)
    (tree.child / "memory.peak").write_text("209715200\n")  # what the kernel saw since the last reset
    limiter.reset_peak(sleeper.pid)
    assert (tree.child / "memory.peak").read_text().startswith("0")  # the reset is a write to the open file
    (tree.child / "memory.peak").write_text(f"{300 * MIB}\n")
    assert limiter.peak_bytes(sleeper.pid) == 300 * MIB
    limiter.close()


def test_without_memory_peak_the_main_process_peak_rss_is_used(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """Kernels before 5.19 have no memory.peak (and before 6.12 it cannot be reset): VmHWM only."""
    tree = make_tree(tmp_path)
    tree.kernel_child(peak=False)
    limiter = CgroupV2Limiter(512, tree.own)
    assert not limiter.peak_resettable
    limiter.attach(sleeper.pid)
    limiter.reset_peak(sleeper.pid)
    assert limiter.peak_bytes(sleeper.pid) == _vm_hwm(sleeper.pid) > 0
    limiter.close()


def test_an_oom_kill_reports_the_whole_limit_once(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    tree = make_tree(tmp_path)
    tree.kernel_child(peak=False)
    limiter = CgroupV2Limiter(128, tree.own)
    limiter.attach(sleeper.pid)
    limiter.reset_peak(sleeper.pid)
    (tree.child / "memory.events").write_text(EVENTS.format(max=40, oom=1))
    assert limiter.peak_bytes(sleeper.pid) == 128 * MIB
    limiter.reset_peak(sleeper.pid)  # the next invocation measures again
    assert limiter.peak_bytes(sleeper.pid) < 128 * MIB
    limiter.close()


def test_kill_all_uses_cgroup_kill(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    tree.kernel_child()
    limiter = CgroupV2Limiter(128, tree.own)
    limiter.kill_all()
    assert (tree.child / "cgroup.kill").read_text() == "1"
    limiter.close()


def test_kill_all_signals_each_process_before_kernel_5_14(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    tree = make_tree(tmp_path)
    tree.kernel_child(kill=False)
    limiter = CgroupV2Limiter(128, tree.own)
    limiter.attach(sleeper.pid)
    limiter.kill_all()
    assert sleeper.wait(5) == -9
    limiter.close()


def test_stale_cgroups_of_dead_agents_are_removed(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    dead = 2**22 + 17  # above the default pid_max range, so no such process
    for name in (f"lambdalet-{dead}", f"lambdalet-{dead}-agent", f"lambdalet-{PID}", "lambdalet-other"):
        (tree.own / name).mkdir()
    memory._remove_stale(tree.own)
    assert sorted(p.name for p in tree.own.glob("lambdalet-*")) == [f"lambdalet-{PID}", "lambdalet-other"]


# ------------------------------------------------------------------------------------ choosing


def test_create_limiter_prefers_cgroup_v2(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    tree.kernel_child()
    limiter = create_limiter(128, proc_self=tree.proc, v1_root=tmp_path / "no-v1")
    assert limiter.mechanism == "cgroup-v2"
    limiter.close()


def test_create_limiter_falls_back_to_v1_then_rlimit_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = make_tree(tmp_path, controllers="cpu")
    (tree.proc / "cgroup").write_text("4:memory:/agents\n0::/kubepods/pod-a/c1\n")
    v1 = tmp_path / "v1"
    (v1 / "agents").mkdir(parents=True)
    (v1 / "agents" / "cgroup.procs").write_text("")
    child = v1 / "agents" / f"lambdalet-{PID}"
    child.mkdir()
    (child / "memory.max_usage_in_bytes").write_text("0\n")
    with caplog.at_level(logging.INFO, logger="lambdalet.agent"):
        limiter = create_limiter(128, proc_self=tree.proc, v1_root=v1)
    assert limiter.mechanism == "cgroup-v1"
    assert (child / "memory.limit_in_bytes").read_text() == str(128 * MIB)
    limiter.close()
    assert "no cgroup v2: the memory controller is not delegated" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lambdalet.agent"):
        fallback = create_limiter(128, proc_self=tree.proc, v1_root=tmp_path / "no-v1")
    assert isinstance(fallback, RlimitLimiter)
    assert "no cgroup v1" in caplog.text
    fallback.close()
