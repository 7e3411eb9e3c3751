"""Checks of the cluster configs: ray_config.yaml (Ray cluster launcher) and cluster/rayjob.yaml (KubeRay)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
RAY_CONFIG = ROOT / "ray_config.yaml"
RAYJOB = ROOT / "cluster" / "rayjob.yaml"

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _ray_schema() -> dict:
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    path = Path(ray_autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ray_config() -> dict:
    cfg = yaml.safe_load(RAY_CONFIG.read_text())
    assert isinstance(cfg, dict)
    return cfg


@pytest.fixture(scope="module")
def rayjob() -> dict:
    doc = yaml.safe_load(RAYJOB.read_text())
    assert isinstance(doc, dict)
    return doc


def _commands(cfg: dict, *keys: str) -> list[str]:
    out: list[str] = []
    for k in keys:
        out += list(cfg.get(k) or [])
    return out


def _gpu_node_types(cfg: dict) -> dict:
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != cfg["head_node_type"] and nt.get("resources", {}).get("GPU", 0) > 0
    }


# ----------------------------------------------------------------------------- ray_config.yaml


def test_ray_config_valid_against_ray_schema(ray_config):
    # Raises jsonschema.ValidationError (failing the test with the offending path) if Ray's own
    # schema rejects the file.
    jsonschema.validate(instance=ray_config, schema=_ray_schema())


def test_schema_check_is_not_vacuous(ray_config):
    schema = _ray_schema()
    bad = copy.deepcopy(ray_config)
    bad["not_a_ray_option"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance=bad, schema=schema)
    bad = copy.deepcopy(ray_config)
    name = next(iter(_gpu_node_types(ray_config)))
    bad["available_node_types"][name]["resources"]["GPU"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance=bad, schema=schema)


def test_ray_config_passes_ray_prepare_and_validate(ray_config):
    """What `ray up` does before launching: merge provider defaults, then validate."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(copy.deepcopy(ray_config))
    util.validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_is_cpu_and_gpu_worker_declares_gpus(ray_config):
    types = ray_config["available_node_types"]
    head = types[ray_config["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    gpu_types = _gpu_node_types(ray_config)
    assert gpu_types, "no worker node type declares resources: {GPU: N}"
    for name, nt in gpu_types.items():
        assert nt["resources"]["GPU"] >= 1
        assert nt.get("max_workers", 0) >= 1, name
        assert nt["node_config"].get("InstanceType"), name
    assert ray_config["max_workers"] >= max(nt["max_workers"] for nt in gpu_types.values())
    assert ray_config.get("idle_timeout_minutes", 0) > 0


def test_setup_commands_install_the_project_from_a_file_mount(ray_config):
    mounts = ray_config.get("file_mounts") or {}
    project_mounts = {
        remote for remote, local in mounts.items() if (RAY_CONFIG.parent / local).resolve() == ROOT
    }
    assert project_mounts, "the project directory is not in file_mounts"
    installs = [
        c
        for c in _commands(ray_config, "setup_commands", "worker_setup_commands")
        if re.search(r"\bpip3? install\b", c) or re.search(r"-m pip install\b", c)
    ]
    assert any(
        any(remote.rstrip("/") in tok for tok in shlex.split(c) for remote in project_mounts) for c in installs
    ), f"no pip install of {project_mounts} in {installs}"
    # The console script must exist once setup is done on every node (setup_commands run on all).
    assert any("virnucpro" in c for c in ray_config.get("setup_commands", []))


def _ray_start_commands(cmds: list[str]) -> list[str]:
    return [c for c in cmds if "ray start" in c]


def test_dashboard_on_loopback(ray_config):
    heads = _ray_start_commands(_commands(ray_config, "head_start_ray_commands"))
    assert heads, "no `ray start --head` in head_start_ray_commands"
    for c in heads:
        assert "--head" in c
        hosts = re.findall(r"--dashboard-host[= ]+(\S+)", c)
        assert hosts, f"dashboard host not pinned (Ray's examples use 0.0.0.0): {c}"
        assert all(h.strip("'\"") in LOOPBACK for h in hosts), hosts
    assert "0.0.0.0" not in json.dumps(ray_config["head_start_ray_commands"])


def test_token_authentication_enabled_on_every_node(ray_config):
    # Nothing in the parsed config (comments aside) may switch authentication off.
    assert not re.search(r"RAY_AUTH_MODE\W*disabled", json.dumps(ray_config))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _ray_start_commands(ray_config[key])
        assert starts, key
        for c in starts:
            # RAY_AUTH_MODE must be in the environment of `ray start` (it cannot be set through
            # _system_config), on the head and on workers alike.
            env_in_cmd = re.search(r"RAY_AUTH_MODE=token", c)
            env_in_container = "--env RAY_AUTH_MODE=token" in " ".join(
                (ray_config.get("docker") or {}).get("run_options", [])
            )
            assert env_in_cmd or env_in_container, c
    # Every node gets the locally generated token at Ray's default token path.
    mounts = ray_config.get("file_mounts") or {}
    assert any(remote.endswith(".ray/auth_token") for remote in mounts), mounts


def test_worker_start_joins_the_head(ray_config):
    for c in _ray_start_commands(ray_config["worker_start_ray_commands"]):
        assert "--address=$RAY_HEAD_IP:6379" in c
        assert "--head" not in c


# ----------------------------------------------------------------------------- cluster/rayjob.yaml


def test_rayjob_kind_and_api(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]


def test_rayjob_entrypoint_runs_virnucpro(rayjob):
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "virnucpro"
    assert argv[1] in {"embed", "predict", "preprocess"}
    assert "-o" in argv or "--output" in argv or any(a.startswith("-o") for a in argv)
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_head_and_gpu_worker_group(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_containers = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head_containers and all(c.get("image") for c in head_containers)
    head_res = head_containers[0].get("resources", {})
    assert "nvidia.com/gpu" not in head_res.get("limits", {})

    groups = cluster["workerGroupSpecs"]
    assert groups
    gpu_groups = []
    for g in groups:
        assert g["groupName"]
        assert 0 <= g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", g["replicas"])
        for c in g["template"]["spec"]["containers"]:
            gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None and int(gpus) >= 1:
                gpu_groups.append(g)
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    # Same image everywhere: Ray and Python versions must match across the cluster.
    images = {c["image"] for c in head_containers}
    images |= {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images


def test_rayjob_token_auth_on(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster.get("authOptions", {}).get("mode") == "token"
    major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "token authentication needs Ray >= 2.52"
    assert "disabled" not in json.dumps(cluster)
