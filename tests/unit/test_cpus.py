"""workers = "auto" counts the CPUs this process may use: affinity, then a cgroup v2 quota."""
from __future__ import annotations

import subprocess
import sys

from fastlb import cpus


def _cgroup(tmp_path, lines: str, quotas: dict[str, str]):
    (tmp_path / "cgroup").write_text(lines)
    root = tmp_path / "fs"
    for rel, value in quotas.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(value)
    return dict(cgroup_root=str(root), proc_cgroup=str(tmp_path / "cgroup"))


def test_affinity_is_the_count_without_a_quota(tmp_path):
    paths = _cgroup(tmp_path, "0::/app\n", {"": "max 100000\n", "app": "max 100000\n"})
    assert cpus.usable(affinity={0, 1, 2, 3}, **paths) == 4


def test_quota_lowers_the_count_rounded_up(tmp_path):
    paths = _cgroup(tmp_path, "0::/system.slice/fastlb.service\n",
                    {"system.slice/fastlb.service": "150000 100000\n"})
    assert cpus.usable(affinity=set(range(8)), **paths) == 2


def test_the_tightest_quota_of_any_parent_wins(tmp_path):
    paths = _cgroup(tmp_path, "0::/a/b\n", {"a": "100000 100000\n", "a/b": "400000 100000\n"})
    assert cpus.usable(affinity=set(range(8)), **paths) == 1


def test_quota_never_raises_the_count_nor_goes_below_one(tmp_path):
    paths = _cgroup(tmp_path, "0::/x\n", {"x": "800000 100000\n"})
    assert cpus.usable(affinity={0, 1}, **paths) == 2
    paths = _cgroup(tmp_path, "0::/x\n", {"x": "1000 100000\n"})
    assert cpus.usable(affinity={0, 1}, **paths) == 1


def test_cgroup_v1_or_no_cgroup_file_means_no_quota(tmp_path):
    paths = _cgroup(tmp_path, "4:memory:/x\n1:cpu:/\n", {})
    assert cpus.usable(affinity={0, 1, 2}, **paths) == 3
    assert cpus.usable(affinity={0, 1, 2}, cgroup_root=str(tmp_path),
                              proc_cgroup=str(tmp_path / "missing")) == 3


def test_auto_workers_follow_a_real_affinity_mask():
    """A process pinned to one CPU (taskset, a cpuset) gets one worker, not one per host CPU."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
            "from fastlb import config;"
            "print(config.loads('[global]\\nworkers = \"auto\"\\n[[service]]\\nname = \"a\"\\n"
            "listen = \"127.0.0.1:0\"\\n', resolve=False).global_.workers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
