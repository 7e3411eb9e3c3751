"""Safe defaults (docs/SECURITY.md):

  * a local Ray started by the driver has token authentication on and its dashboard / job API on
    loopback, refusing requests without the token (a running head with token auth and a job
    submitted with and without the token: tests/test_ray_jobs.py);
  * nothing in the package unpickles a file except through a tensors-only `torch.load` or the
    classifier's restricted unpickler (whose refusal of unexpected globals, code never run, is
    tests/test_classifier.py::test_malicious_global_is_refused_and_not_run and
    test_other_globals_are_refused; the ESM-2 loader's: tests/test_models.py::test_checkpoint_loader_never_unpickles_code);
  * record ids never become paths: hostile ids are ordinary rows and no file appears outside OUT_DIR.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("virnucpro", "cluster", "actors")


# --- Ray: token authentication and loopback -----------------------------------------------------------

PROBE = r"""
import json, os, time, urllib.error, urllib.request
import ray
from cluster.session import init_ray, token_auth_enabled

def status(url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None

def listening(port):
    # local addresses of the sockets listening on this TCP port (hex, as /proc/net/tcp{,6} shows them)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            address, hexport = f[1].rsplit(":", 1)
            if f[3] == "0A" and int(hexport, 16) == port:
                found.append(address)
    return found

assert init_ray()
token_file = os.path.expanduser("~/.ray/auth_token")
url = ray._private.worker.global_worker.node.address_info["webui_url"]
token = open(token_file).read().strip() if os.path.exists(token_file) else None
deadline = time.monotonic() + 60
while status(f"http://{url}/api/version", token) != 200 and time.monotonic() < deadline:
    time.sleep(0.5)
print("PROBE " + json.dumps({
    "auth": token_auth_enabled(), "token_file": token is not None, "url": url,
    "listening": listening(int(url.rsplit(":", 1)[1])),
    "jobs_without_token": status(f"http://{url}/api/jobs/"),
    "jobs_with_wrong_token": status(f"http://{url}/api/jobs/", "0" * 32),
    "jobs_with_token": status(f"http://{url}/api/jobs/", token)}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_has_token_auth_and_a_loopback_dashboard(tmp_path):
    """The driver's own `ray.init` in a clean environment (no RAY_AUTH_MODE, a fresh HOME): token
    authentication on with a newly created token, the dashboard and job API listening on 127.0.0.1
    only and refusing requests without the token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    probe = json.loads(lines[0].removeprefix("PROBE "))
    assert probe["auth"] and probe["token_file"] and (tmp_path / ".ray" / "auth_token").is_file()
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600  # Ray wrote it 0644
    assert probe["url"].startswith("127.0.0.1:")
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert probe["listening"] and set(probe["listening"]) <= loopback, probe["listening"]
    assert probe["jobs_without_token"] == 401 and probe["jobs_with_wrong_token"] in (401, 403)
    assert probe["jobs_with_token"] == 200


def test_init_ray_binds_loopback_unless_told_and_warns_without_auth(monkeypatch, caplog, tmp_path):
    import ray

    import cluster.session as session

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 32)
    (tmp_path / ".ray" / "auth_token").chmod(0o644)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(session, "token_auth_enabled", lambda: True)
    assert session.init_ray()
    assert calls[-1]["dashboard_host"] == "127.0.0.1"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600  # the token is private
    monkeypatch.setattr(session, "token_auth_enabled", lambda: False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with caplog.at_level(logging.WARNING, "virnucpro"):
        session.init_ray(dashboard_host="0.0.0.0")
    assert calls[-1]["dashboard_host"] == "0.0.0.0"
    assert "listen on 0.0.0.0, not only on loopback" in caplog.text
    assert "without token authentication (RAY_AUTH_MODE=disabled" in caplog.text
    # the option reaches the driver from the command line
    from cluster.cli import create_parser
    from virnucpro.options import EmbedOptions, from_args
    args = create_parser().parse_args(["embed", "in.faa", "-o", "out", "--model", "m"])
    assert from_args(EmbedOptions, args).dashboard_host == "127.0.0.1"


def test_local_ray_dashboard_by_input_size_or_flag(monkeypatch, caplog, tmp_path, esm_tiny):
    """A run's own Ray starts its dashboard for an input of DASHBOARD_MIN_BYTES or more, or when asked
    (--dashboard); a small run skips it (1-2 s of start-up) and says so. The flag reaches the `RaySession`
    from the command line."""
    import ray

    import cluster.cli
    import cluster.session as session

    small, large = tmp_path / "small.faa", tmp_path / "large.faa"
    small.write_text(">a\nMKV\n")
    with open(large, "wb") as f:
        f.write(b">a\nMKV\n")  # FASTA by its start, which is all the command checks before Ray
        f.truncate(session.DASHBOARD_MIN_BYTES)  # sparse: its size is what counts
    assert not session.local_dashboard(None, small)
    assert session.local_dashboard(None, large)
    assert session.local_dashboard(None, small, large)  # train: both sets together
    assert session.local_dashboard(True, small) and not session.local_dashboard(False, large)
    assert not session.local_dashboard(None, tmp_path / "missing.faa")  # the run reports it, not this

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(session, "token_auth_enabled", lambda: True)
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, "virnucpro"):
        session.init_ray(dashboard=False)
    assert calls[-1]["include_dashboard"] is False and "without its dashboard" in caplog.text
    session.init_ray()
    assert calls[-1]["include_dashboard"] is None  # Ray's default: the dashboard when its packages are there
    session.init_ray("ray://elsewhere:10001", dashboard=False)  # a cluster joined keeps what it has
    assert "include_dashboard" not in calls[-1]

    seen = []

    def session(address=None, dashboard_host="127.0.0.1", dashboard=True, **kwargs):
        seen.append(dashboard)
        raise RuntimeError("stop here")

    monkeypatch.setattr(cluster.cli, "RaySession", session)
    for argv, expected in (([str(small)], False), ([str(large)], True), ([str(small), "--dashboard"], True),
                           ([str(large), "--no-dashboard"], False)):
        with pytest.raises(RuntimeError, match="stop here"):
            cluster.cli.run(cluster.cli.create_parser().parse_args(
                ["embed", *argv, "-o", str(tmp_path / "out"), "--model", str(esm_tiny)]))
        assert seen[-1] is expected, argv


# --- no unpickling of untrusted files -------------------------------------------------------------------

def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node
            while function in parents and not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                function = parents[function]
            yield node, getattr(function, "name", "<module>")


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path


UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads",
                "dill.load", "dill.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open",
                "pandas.read_pickle", "pd.read_pickle", "torch.jit.load", "yaml.load", "yaml.unsafe_load",
                "eval", "exec"}


def test_torch_load_is_tensors_only_except_the_classifiers_restricted_unpickler():
    found = []
    for name, path in _sources():
        for call, function in _calls(path):
            if _dotted(call.func) != "torch.load":
                continue
            kw = {k.arg: k.value for k in call.keywords}
            weights_only = kw.get("weights_only")
            if isinstance(weights_only, ast.Constant) and weights_only.value is True:
                continue
            # the one other way: a restricted unpickler that resolves only an allow-list of globals
            pickle_module = _dotted(kw["pickle_module"]) if "pickle_module" in kw else None
            found.append((name, function, pickle_module))
    assert found == [("virnucpro/pipeline/classifier.py", "_load_object", "_RESTRICTED_PICKLE")], found


def test_no_other_deserialisation_of_files():
    unsafe = []
    for name, path in _sources():
        text = path.read_text()
        assert "trust_remote_code" not in text or name == "virnucpro/models/dnabert_s.py", name
        for call, function in _calls(path):
            dotted = _dotted(call.func)
            if dotted in UNSAFE_CALLS:
                unsafe.append((name, function, dotted))
            if dotted.endswith("np.load") or dotted == "numpy.load":
                assert not any(k.arg == "allow_pickle" for k in call.keywords), (name, function)
    assert unsafe == [], unsafe
    # pickle's Unpickler is only subclassed once, by the restricted one, which overrides find_class
    tree = ast.parse((ROOT / "virnucpro" / "pipeline" / "classifier.py").read_text())
    restricted = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_RestrictedUnpickler"]
    assert len(restricted) == 1 and [_dotted(b) for b in restricted[0].bases] == ["pickle.Unpickler"]
    assert "find_class" in {n.name for n in restricted[0].body if isinstance(n, ast.FunctionDef)}
    subclasses = [(name, n.name) for name, path in _sources() for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.ClassDef) and any("Unpickler" in _dotted(b) for b in n.bases)]
    assert subclasses == [("virnucpro/pipeline/classifier.py", "_RestrictedUnpickler")]


# --- record ids never become paths -----------------------------------------------------------------------

HOSTILE_IDS = ["../../etc/passwd", "/abs/path/x", "..", ".", "part-000000.parquet", "_manifest.parquet",
               "~root/.ssh/authorized_keys", "$(touch${IFS}pwned)", "a\\..\\..\\b", "%2e%2e%2fescape",
               "C:\\Windows\\x", "x\x00y", "..%00", ".hidden"]


@pytest.mark.slow
def test_record_ids_cannot_escape_the_output_directory(tmp_path, esm_tiny):
    import ray

    from cluster.driver import embed
    from virnucpro.io.output import MANIFEST, Manifest, read_embeddings

    fasta = tmp_path / "in.faa"
    fasta.write_bytes(b"".join(b">" + rid.encode() + b" description\nMKVL\n" for rid in HOSTILE_IDS))
    out = tmp_path / "a" / "b" / "out"
    before = {p for p in tmp_path.rglob("*")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        embed(fasta, out, esm_tiny, device="cpu", num_actors=1, toks_per_batch=24, progress=False)
    finally:
        ray.shutdown()
    table = read_embeddings(out)
    assert table.column("id").to_pylist() == HOSTILE_IDS  # ordinary rows, ids exactly as given
    made = {p for p in tmp_path.rglob("*")} - before
    inside = {p for p in made if p == out or out in p.parents}
    assert made - inside <= {tmp_path / "a", tmp_path / "a" / "b"}, sorted(map(str, made - inside))
    batches = Manifest.load(out).num_batches
    assert batches > 1 and {p.name for p in out.iterdir()} == {MANIFEST} | {f"part-{b:06d}.parquet"
                                                                          for b in range(batches)}
    assert not Path("/abs").exists() and not (tmp_path / "pwned").exists() and not Path("pwned").exists()
