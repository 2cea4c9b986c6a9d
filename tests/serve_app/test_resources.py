"""CPU sizing of the defaults (serve_app/resources.py) and where the builder applies it."""
from __future__ import annotations

import pytest

from serve_app import AppSettings
from serve_app.builder import ingress_options, ingress_replicas, with_ingress_sized
from serve_app.resources import (cgroup_cpu_limit, cgroup_mounts, gpu_ingress_replicas, model_torch_threads,
                                 own_cgroups, usable_cpus)


@pytest.fixture(autouse=True)
def _no_env_secrets(monkeypatch):
    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


# --- the CPU quota as the kernel applies it: the process's own cgroup and its ancestors, v1 and v2 --------------

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = "9:name=systemd:/\n4:memory:/other\n2:cpu,cpuacct:/kubepods/pod1/ctr\n0::/\n"
V2_MOUNTS = "28 22 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def fake_host(tmp_path, cgroup: str, mountinfo: str | None):
    """A /proc/self of `cgroup` and `mountinfo` texts, and an empty filesystem root for the cgroup trees."""
    proc = tmp_path / "proc"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    if mountinfo is not None:
        (proc / "mountinfo").write_text(mountinfo)
    return proc, tmp_path / "root"


def v1_quota(directory, quota: int, period: int = 100000):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (directory / "cpu.cfs_period_us").write_text(f"{period}\n")


def v2_quota(directory, value: str):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.max").write_text(value + "\n")


def test_cgroup_v1_reads_the_processs_own_cpu_cgroup_and_takes_the_smallest_quota_up_the_tree(tmp_path):
    proc, root = fake_host(tmp_path, V1_CGROUP, V1_MOUNTS)
    mount = root / "sys/fs/cgroup/cpu,cpuacct"
    v1_quota(mount, -1)  # the hierarchy's root: unlimited
    v1_quota(mount / "kubepods", 800000)  # 8 CPUs for all pods
    v1_quota(mount / "kubepods/pod1", 250000)  # 2.5 for the pod: the one that binds
    v1_quota(mount / "kubepods/pod1/ctr", -1)  # the container itself sets none
    v1_quota(mount / "other", 50000)  # another cgroup's (the memory controller's path): not ours
    assert cgroup_cpu_limit(proc, root) == 2.5
    v1_quota(mount / "kubepods/pod1/ctr", 150000, period=50000)  # 3 CPUs: the pod's 2.5 still binds
    assert cgroup_cpu_limit(proc, root) == 2.5
    v1_quota(mount / "kubepods/pod1/ctr", 60000, period=50000)  # 1.2 at the leaf
    assert cgroup_cpu_limit(proc, root) == 1.2


def test_cgroup_v2_reads_the_unified_path_and_nested_quotas(tmp_path):
    proc, root = fake_host(tmp_path, "0::/system.slice/app.service/worker\n", V2_MOUNTS)
    mount = root / "sys/fs/cgroup"
    v2_quota(mount / "system.slice", "400000 100000")
    v2_quota(mount / "system.slice/app.service", "max 100000")
    v2_quota(mount / "system.slice/app.service/worker", "300000 100000")
    assert cgroup_cpu_limit(proc, root) == 3.0
    v2_quota(mount / "system.slice/app.service", "150000 100000")
    assert cgroup_cpu_limit(proc, root) == 1.5
    v2_quota(mount / "user.slice", "10000 100000")  # another cgroup's quota is never read
    assert cgroup_cpu_limit(proc, root) == 1.5


def test_cgroup_unlimited_at_every_level_is_none(tmp_path):
    proc, root = fake_host(tmp_path, "0::/a/b\n", V2_MOUNTS)
    for d in ("", "a", "a/b"):
        v2_quota(root / "sys/fs/cgroup" / d, "max 100000")
    assert cgroup_cpu_limit(proc, root) is None
    proc1, root1 = fake_host(tmp_path / "v1", V1_CGROUP, V1_MOUNTS)
    v1_quota(root1 / "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/ctr", -1)
    assert cgroup_cpu_limit(proc1, root1) is None


def test_cgroup_a_namespaced_container_sees_its_cgroup_at_the_mount_root(tmp_path):
    """cgroup namespace (Docker / Kubernetes with cgroup v2): /proc/self/cgroup says "/" and the mount shows the
    container's own cgroup; a bind-mounted v1 hierarchy shows its own path as the mount root instead."""
    proc, root = fake_host(tmp_path, "0::/\n", V2_MOUNTS)
    v2_quota(root / "sys/fs/cgroup", "200000 100000")
    assert cgroup_cpu_limit(proc, root) == 2.0
    bind = "40 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n"
    proc1, root1 = fake_host(tmp_path / "bind", "3:cpu,cpuacct:/docker/abc\n", bind)
    v1_quota(root1 / "sys/fs/cgroup/cpu", 50000)
    assert cgroup_cpu_limit(proc1, root1) == 0.5


def test_cgroup_hybrid_hosts_read_the_cpu_controller_on_v1(tmp_path):
    proc, root = fake_host(tmp_path, V1_CGROUP, V1_MOUNTS)
    v1_quota(root / "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/ctr", 200000)
    v2_quota(root / "sys/fs/cgroup/unified", "50000 100000")  # the unified tree carries no cpu controller here
    assert cgroup_cpu_limit(proc, root) == 2.0


def test_cgroup_unreadable_or_missing_files_are_skipped_or_none(tmp_path):
    proc, root = fake_host(tmp_path, "0::/a/b\n", V2_MOUNTS)
    mount = root / "sys/fs/cgroup"
    v2_quota(mount / "a", "300000 100000")
    (mount / "a/b").mkdir()
    (mount / "a/b/cpu.max").mkdir()  # unreadable as a file: that level is skipped, the parent's quota holds
    assert cgroup_cpu_limit(proc, root) == 3.0
    v2_quota(mount / "a", "garbage")
    assert cgroup_cpu_limit(proc, root) is None
    assert cgroup_cpu_limit(tmp_path / "no-proc", root) is None  # no /proc/self/cgroup: unknown
    proc2, root2 = fake_host(tmp_path / "weird", "not a cgroup file\n", V2_MOUNTS)
    assert cgroup_cpu_limit(proc2, root2) is None


def test_cgroup_without_mountinfo_uses_the_usual_mount_points(tmp_path):
    proc, root = fake_host(tmp_path, "0::/svc\n", None)
    v2_quota(root / "sys/fs/cgroup/svc", "120000 100000")
    assert cgroup_cpu_limit(proc, root) == 1.2


def test_cgroup_mountinfo_escapes_and_parsing():
    info = ("50 31 0:29 /my\\040dir /sys/fs/cgroup/cpu\\040x rw - cgroup cgroup rw,cpu\n"
            "bad line\n51 31 0:30 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n")
    mounts = cgroup_mounts(info)
    assert set(mounts) == {1} and (mounts[1].root, mounts[1].point) == ("/my dir", "/sys/fs/cgroup/cpu x")
    assert own_cgroups("12:cpuset:/a\n3:cpuacct,cpu:/b\n0::/c\n") == {1: "/b", 2: "/c"}


def test_this_machines_quota_reads_without_error():
    limit = cgroup_cpu_limit()
    assert limit is None or limit > 0


def test_usable_cpus_is_the_affinity_capped_by_the_quota():
    assert usable_cpus({0, 1, 2, 3}, limit=None) == 4
    assert usable_cpus({0, 1, 2, 3}, limit=1.5) == 2  # a fraction of a CPU still gets a thread
    assert usable_cpus({0, 1}, limit=8.0) == 2
    assert usable_cpus({0}, limit=0.2) == 1
    assert 1 <= usable_cpus() <= 4096


def test_model_threads_follow_num_cpus_when_set_else_the_visible_cpus():
    assert model_torch_threads(None, "cpu", 8) == (8, "node share")  # the default: up to the whole machine
    assert model_torch_threads(0.5, "cpu", 8) == (1, "num_cpus")      # explicit: as reserved (>= 1)
    assert model_torch_threads(2.7, "cpu", 8) == (2, "num_cpus")
    assert model_torch_threads(None, "cuda", 8) == (None, "default")


def test_gpu_ingress_replicas_from_the_node_cpus():
    assert gpu_ingress_replicas(1) == 1 and gpu_ingress_replicas(2) == 1
    assert gpu_ingress_replicas(16) == 8
    assert gpu_ingress_replicas(256) == 16


def test_ingress_replicas_default_one_on_cpu_sized_on_gpu_explicit_wins():
    cpu = AppSettings.model_validate({"models": [{"model_id": "org/a"}, {"model_id": "org/b"}]})
    assert cpu.ingress.num_replicas is None
    assert ingress_replicas(cpu, node_cpus=64) == 1
    gpu = AppSettings.model_validate({"models": [{"model_id": "org/a", "num_gpus": 1}]})
    assert ingress_replicas(gpu, node_cpus=16) == 8
    sized = with_ingress_sized(gpu, node_cpus=16)
    assert sized.ingress.num_replicas == 8 and gpu.ingress.num_replicas is None  # a copy: /info reports 8
    assert ingress_options(sized)["num_replicas"] == 8
    explicit = AppSettings.model_validate({"models": [{"model_id": "org/a", "num_gpus": 1}],
                                           "ingress": {"num_replicas": 3}})
    assert ingress_replicas(explicit, node_cpus=16) == 3 and with_ingress_sized(explicit, 16) is explicit
    scaled = AppSettings.model_validate({"models": [{"model_id": "org/a", "num_gpus": 1}],
                                         "ingress": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}})
    assert with_ingress_sized(scaled, 16) is scaled and "num_replicas" not in ingress_options(scaled)
