"""The Ray session of a run: joining a cluster or starting a local Ray, and where the actors go.

`init_ray` joins the given cluster or RAY_ADDRESS (a `ray job submit` entry point finds it set), or
starts a local Ray with token authentication and a loopback dashboard (`local_dashboard` says whether a
run's own Ray gets one). `Placement.of` turns the
options and the cluster's resources into a device, an actor count and each actor's GPU share; the
embedding driver and `predict` both place their actors through it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from virnucpro.errors import EmbedError
from virnucpro.options import EmbedOptions

log = logging.getLogger("virnucpro")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# A local Ray started by a command ends with it. Its dashboard costs seconds of `ray.init` (bench/README.md,
# "Start-up"), more than a small job's whole embedding on a GPU, and nobody opens the dashboard of a run
# that ends in seconds; from this input size on, the run lasts long enough to watch.
DASHBOARD_MIN_BYTES = 16 << 20


def local_dashboard(choice: bool | None, *inputs: str | Path) -> bool:
    """Whether a local Ray started for a run gets its dashboard: `choice` (--dashboard / --no-dashboard)
    when given, else whether the inputs (files on disk, as given) add up to DASHBOARD_MIN_BYTES or more.

    >>> local_dashboard(None, "examples/proteins.faa")  # a small input
    False
    >>> local_dashboard(True, "examples/proteins.faa")
    True
    """
    if choice is not None:
        return choice
    size = 0
    for path in inputs:
        try:
            size += Path(path).stat().st_size
        except OSError:  # a missing input is reported by the run itself, with its own message
            pass
    return size >= DASHBOARD_MIN_BYTES


def init_ray(address: str | None = None, dashboard_host: str = "127.0.0.1", dashboard: bool = True) -> bool:
    """Connect to Ray unless this process already is; True when this call connected (and so should
    disconnect at the end).

    A local Ray keeps token authentication on (Ray >= 2.52 turns it on for a new local cluster unless
    RAY_AUTH_MODE says otherwise; the token is ~/.ray/auth_token, created if missing) and serves its
    dashboard and job API on loopback unless `dashboard_host` says otherwise. Turning either off is the
    user's explicit choice, and is logged. `dashboard` False: a local Ray without its dashboard (Ray
    still serves a minimal API server), said in a log line; a Ray joined keeps what it has."""
    import ray  # here, not at the top: `start_ray` pays for this import in its thread

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, TimeoutError) as e:
            raise EmbedError(f"cannot reach the Ray cluster at {address} (--address or RAY_ADDRESS): "
                             f"{' '.join(str(e).split())[:200]}") from None
        return True
    if dashboard_host not in _LOOPBACK:
        log.warning("the Ray dashboard and job API listen on %s, not only on loopback", dashboard_host)
    ray.init(include_dashboard=None if dashboard else False, dashboard_host=dashboard_host,
             logging_level=logging.WARNING, log_to_driver=True)
    if not dashboard:
        log.info("local Ray without its dashboard (by default only an input of %d MiB or more gets one: a "
                 "smaller run ends in seconds); --dashboard starts it", DASHBOARD_MIN_BYTES >> 20)
    if not token_auth_enabled():
        log.warning("the local Ray runs without token authentication (RAY_AUTH_MODE=%s, Ray %s): any process "
                    "that reaches its ports can run code as you", os.environ.get("RAY_AUTH_MODE", "unset"),
                    ray.__version__)
    _protect_token_file(Path.home() / ".ray" / "auth_token")
    return True


_RAY_THREAD_POLL_SECONDS = 1.0


def start_ray(address: str | None = None, dashboard_host: str = "127.0.0.1",
              on_ready: Callable[[], None] | None = None, dashboard: bool = True) -> Future:
    """`init_ray` in the background: Ray takes seconds to start (and to import), time the caller spends
    on its own imports, checking the model and indexing the input. The future says whether it connected;
    `on_ready` is called (in the background thread) the moment Ray is up (the start-up timeline).

    The thread stays alive until Ray is shut down: Ray's local processes (GCS, raylet) die with the
    thread that started them (Linux's parent-death signal is per thread)."""
    future: Future = Future()

    def run() -> None:
        try:
            connected = init_ray(address, dashboard_host, dashboard)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for Ray
            future.set_exception(e)
            return
        import ray

        from actors.ray_internals import current_node

        # Until this connection's ray.shutdown() has stopped the processes: it marks Ray uninitialised
        # first, and a driver whose raylet died before its core worker stopped waits seconds on a last
        # metrics export. Ray drops the node last (a Ray Client connection has none: there, until Ray
        # is uninitialised).
        node = current_node()  # before anyone can shut down and start another
        if on_ready is not None:
            on_ready()
        future.set_result(connected)
        while connected and current_node() is node and (node is not None or ray.is_initialized()):
            time.sleep(_RAY_THREAD_POLL_SECONDS)

    threading.Thread(target=run, name="virnucpro-ray", daemon=True).start()
    return future


class RaySession:
    """The Ray connection of one command or call: started at once in the background (`start_ray`), waited
    for where Ray is first needed (`wait`), and shut down at the end (`close`) when this session connected
    it. The one place a run starts and stops Ray.

    >>> session = RaySession(address=None, dashboard=False)   # Ray starts; the caller goes on
    >>> session.wait()                                        # ... until it needs Ray
    >>> session.close()                                       # shut down if this session connected
    """

    def __init__(self, address: str | None = None, dashboard_host: str = "127.0.0.1", dashboard: bool = True,
                 on_ready: Callable[[], None] | None = None, started: Future | None = None):
        self.future = started or start_ray(address, dashboard_host, on_ready, dashboard)

    def wait(self) -> bool:
        """Block until Ray is up; True when this session connected it (Ray's own error if it failed)."""
        return self.future.result()

    def close(self, wait: bool = True) -> float:
        """Disconnect if this session connected (after a start that failed: nothing); the seconds it took.
        `wait` False: while Ray is still starting, return at once (a command that is about to exit: its Ray
        processes end with it)."""
        start = time.perf_counter()
        if not wait and not self.future.done():
            return 0.0
        try:
            connected = self.future.result()
        except Exception:  # noqa: BLE001 - the run's own error is the one to report
            log.debug("Ray start failed", exc_info=True)
            return 0.0
        if connected:
            import ray

            ray.shutdown()
        return time.perf_counter() - start


def _cpus_per_gpu() -> float:
    """CPUs per GPU of the GPU nodes (the fewest, if they differ), from Ray's view of the cluster."""
    import ray

    shares = [n["Resources"].get("CPU", 0.0) / n["Resources"]["GPU"] for n in ray.nodes()
              if n.get("Alive") and n.get("Resources", {}).get("GPU")]
    return min(shares, default=1.0)


def _protect_token_file(path: Path) -> None:
    """Ray writes ~/.ray/auth_token with the default umask (often world-readable): anyone who can read
    it can run code on the cluster as you. Make it readable by its owner alone."""
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
            log.info("%s: made readable by its owner only (it was mode %o)", path, st.st_mode & 0o777)
    except OSError:
        pass


def token_auth_enabled() -> bool:
    """Whether this process's Ray uses token authentication (False on Ray versions without it)."""
    from actors.ray_internals import token_auth_enabled as enabled

    return enabled()


@dataclass(frozen=True)
class Placement:
    """Where a run's actors go: device, how many, and the Ray GPU resource each reserves."""

    device: str  # "cuda" or "cpu"
    num_actors: int
    gpus_per_actor: float
    cluster_gpus: float
    cluster_cpus: float
    cpus_per_actor: float = 1.0  # what an actor's node has per GPU (per actor on CPU): its loaders' share

    @classmethod
    def of(cls, opts: EmbedOptions) -> Placement:
        """Resolve `auto` against the connected cluster's resources; default: one actor per GPU (or per
        `gpus_per_actor` share of one), one on CPU."""
        import ray



        resources = ray.cluster_resources()
        gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        device = opts.device if opts.device != "auto" else ("cuda" if gpus > 0 else "cpu")
        if device == "cuda" and gpus == 0:
            raise EmbedError("--device cuda, but the Ray cluster has no GPU resources")
        share = opts.gpus_per_actor
        if share is None:
            share = 1.0 if device == "cuda" else 0.0
        if device == "cuda" and share == 0:
            raise EmbedError("--device cuda needs --gpus-per-actor > 0 (Ray assigns GPUs by that resource)")
        if share > gpus:
            raise EmbedError(f"--gpus-per-actor {share:g}, but the Ray cluster has {gpus:g} GPU(s)")
        if opts.num_actors:
            n = opts.num_actors
        elif share > 0:
            n = max(1, int(gpus / share + 1e-9))
        else:
            n = 1
        return cls(device, n, share, gpus, cpus, _cpus_per_gpu() if device == "cuda" else cpus / n)

    @property
    def dataloader_workers(self) -> int:
        """The default of --dataloader-workers: min(cpu_count // num_gpus, 8) of an actor's node, at least 1."""
        return max(1, min(int(self.cpus_per_actor), 8))

    @property
    def num_gpus(self) -> int:
        """GPUs the run can use (0 on CPU): what the dataloader-worker default divides by."""
        return int(self.cluster_gpus) if self.device == "cuda" else 0
