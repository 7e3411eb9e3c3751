"""`virnucpro serve start|status|stop`, and the pool through which a job uses a running service.

A service is a Ray Serve application named NAME of two deployments: the model
(`actors.service.EmbeddingService`), loaded on N replicas or on as many as its queue needs between
--min-replicas and --max-replicas, and in front of it a light CPU ingress (`actors.ingress`) that
answers HTTP at /NAME and hands the model token batches, retrying those whose replica dies.
`virnucpro embed --service NAME` deals its batches to the model deployment through `service_pool`,
which has the surface of the job's own `ActorPool`: Serve routes each batch to a replica, restarts
replicas that die (the batch is dealt again, as with a dead actor), and shares the replicas among
jobs. Each job keeps at most a few batches per replica in flight, so a job of 10^6 sequences and one
of 100 take turns at the replicas' queues: the small one waits for a few batches, not for the large one.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import partial

from virnucpro.batching import interface_fingerprint
from virnucpro.options import EmbedOptions

from actors.ray_internals import object_ref

from .pool import ActorPool
from .scheduling import EmbedError
from virnucpro.errors import OptionError

log = logging.getLogger("virnucpro")

DEPLOYMENT = "EmbeddingService"
INGRESS = "EmbeddingIngress"
DEFAULT_NAME = "virnucpro"
DEFAULT_HTTP_PORT = 8000
MAX_ONGOING_REQUESTS = 64  # queued batches a replica accepts, all jobs and HTTP requests together


@dataclass(frozen=True)
class Scaling:
    """Serve's autoscaling of the model replicas on their queues: a replica is added while they hold
    more than `target` batches each (for `upscale_delay_s`), one is removed while they hold fewer (for
    `downscale_delay_s`), between `min_replicas` (0: none while idle) and `max_replicas`."""

    min_replicas: int
    max_replicas: int
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_s: float = 30.0  # the window over which the queues are averaged
    # how often the queues are reported (None: Serve's default, 10 s; Serve deprecates setting it, and has
    # no other way yet to set it per deployment)
    metrics_interval_s: float | None = None

    def __post_init__(self):
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise OptionError(f"--min-replicas {self.min_replicas} --max-replicas {self.max_replicas}: need "
                             f"0 <= min <= max and max >= 1")

    def serve_config(self, target: float) -> dict:
        """Serve's `autoscaling_config`. A service starts with at least one replica, even where it may
        scale to zero: `serve start` then proves that the model loads, and the first job finds it warm."""
        config = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                  "initial_replicas": max(1, self.min_replicas), "target_ongoing_requests": target,
                  "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                  "look_back_period_s": self.look_back_s}
        if self.metrics_interval_s is not None:
            config["metrics_interval_s"] = self.metrics_interval_s
        return config


def connect(address: str | None = None, start_if_missing: bool = False, dashboard_host: str = "127.0.0.1") -> None:
    """Join the cluster that holds the services: `address`, RAY_ADDRESS, or the Ray running on this
    machine. With `start_if_missing`, start one (`ray start --head`, token authentication on, dashboard
    on `dashboard_host`) that outlives this command, as a service must."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    except ConnectionError as e:
        if address != "auto":
            raise EmbedError(f"cannot reach the Ray cluster at {address}: {' '.join(str(e).split())[:200]}") from None
        if not start_if_missing:
            raise EmbedError("no Ray cluster is running here: start a service first (virnucpro serve start), or "
                             "give --address") from None
    ray_cli = shutil.which("ray") or None
    cmd = [ray_cli] if ray_cli else [sys.executable, "-m", "ray.scripts.scripts"]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    log.info("starting a local Ray cluster for the service (ray start --head; stop it with `ray stop`)")
    subprocess.run([*cmd, "start", "--head", f"--dashboard-host={dashboard_host}", "--disable-usage-stats"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    ray.init(address="auto", logging_level=logging.WARNING)


def start_service(model: str, name: str = DEFAULT_NAME, replicas: int = 1, gpus_per_replica: float | None = None,
                  opts: EmbedOptions | None = None, http_host: str = "127.0.0.1",
                  http_port: int = DEFAULT_HTTP_PORT, actor_class: type | None = None,
                  scaling: Scaling | None = None, limits=None) -> dict:
    """Deploy `model` as service `name` on the connected cluster and wait until its replicas are up:
    `replicas` of them, or as many as its queue needs within `scaling`'s bounds. `limits`: the HTTP
    requests' (`actors.ingress.Limits`: sizes, timeout, queue). `actor_class`: what each replica runs,
    `Embedder` or a subclass (the tests inject faults with it)."""
    from ray import serve

    from actors.embedder import ActorConfig
    from actors.ingress import EmbeddingIngress, IngressConfig, Limits
    from actors.service import EmbeddingService, ServiceConfig
    from virnucpro.models import check_model, default_toks_per_batch, load_tokenizer, resolve_model

    from .session import Placement

    opts = opts or EmbedOptions()
    limits = limits or Limits()
    source = resolve_model(model)
    check_model(source)  # a bad checkpoint fails here, not in every replica
    running = next((s for s in service_status(name)), None)
    if running is not None:  # serve.run would replace its model under the jobs using it
        raise EmbedError(f"service '{name}' is running already ({running['model'] or 'starting'}): stop it first "
                         f"(virnucpro serve stop --name {name}), or give another --name")
    place = Placement.of(opts.replace(gpus_per_actor=gpus_per_replica, num_actors=replicas))
    toks = opts.toks_per_batch or default_toks_per_batch(source, place.device)
    config = ServiceConfig(ActorConfig(source, None, place.device, opts), toks_per_batch=toks,
                           max_replicas=scaling.max_replicas if scaling else replicas,
                           **({"actor_class": actor_class} if actor_class else {}))
    # a replica is as busy as it should be with the batches one job keeps in flight on it
    size = ({"autoscaling_config": scaling.serve_config(target=opts.cuda_streams + 1)} if scaling
            else {"num_replicas": replicas})
    # no access log: a line per call ("CALL embed OK") is a line per batch of every job, forwarded to the
    # drivers' terminals; the replicas' own log lines (loading, errors) stay
    quiet = {"logging_config": {"enable_access_log": False}}
    model_deployment = serve.deployment(EmbeddingService).options(
        name=DEPLOYMENT, max_ongoing_requests=MAX_ONGOING_REQUESTS, **size,
        ray_actor_options={"num_gpus": place.gpus_per_actor, "num_cpus": 1},
        health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=30, **quiet)
    # the ingress parses, tokenises and encodes; it takes no CPU from the cluster's count, as Serve's proxy
    ingress = serve.deployment(EmbeddingIngress).options(
        name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=limits.max_requests, max_queued_requests=limits.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": limits.retry_after_s}, **quiet)
    ingress_config = IngressConfig(source, load_tokenizer(source, opts.truncation_seq_length), toks, limits)
    serve.start(http_options={"host": http_host, "port": http_port})
    log.info("starting service '%s': %s of %s on %s", name, f"{scaling.min_replicas}-{scaling.max_replicas} "
             "replicas (autoscaling)" if scaling else f"{replicas} replica(s)", source.name, place.device)
    serve.run(ingress.bind(ingress_config, model_deployment.bind(config)), name=name, route_prefix=f"/{name}",
              blocking=False)
    return next(s for s in service_status() if s["name"] == name)


def service_status(name: str | None = None) -> list[dict]:
    """The virnucpro services on the connected cluster: name, status, replicas by state, model, route."""
    from ray import serve

    out = []
    for app_name, app in serve.status().applications.items():
        deployment = app.deployments.get(DEPLOYMENT)
        if deployment is None or (name is not None and app_name != name):
            continue
        model = toks = None
        if deployment.replica_states.get("RUNNING", 0) == 0:  # asking would wake a service scaled to zero
            model = "(no replica running: scaled to zero, or starting)"
        elif deployment.status in ("HEALTHY", "UPSCALING", "DOWNSCALING"):
            try:
                info = _described(app_name, partial(serve.get_deployment_handle, DEPLOYMENT, app_name=app_name),
                                  timeout_s=30)
                model, toks = info["source"].name, info["toks_per_batch"]
            except InterfaceMismatch:
                model = "(another VirNucPro: restart this service)"
            except EmbedError:
                model = "(not answering: see virnucpro serve status again, or the replicas' logs)"
        out.append({"name": app_name, "status": getattr(app.status, "value", str(app.status)), "replicas": dict(deployment.replica_states),
                    "route": f"/{app_name}", "model": model, "toks_per_batch": toks})
    return out


def stop_service(name: str = DEFAULT_NAME) -> None:
    from ray import serve

    if not any(s["name"] == name for s in service_status()):
        raise EmbedError(f"no virnucpro service named '{name}' is running (virnucpro serve status lists them)")
    serve.delete(name)


def describe_service(name: str) -> dict:
    """What a job needs from the service (model source, tokenizer, width), from one of its replicas,
    once it is known to speak this VirNucPro's interface."""
    from ray import serve

    return _described(name, partial(serve.get_deployment_handle, DEPLOYMENT, app_name=name), timeout_s=120)


class InterfaceMismatch(EmbedError):
    """The service runs another VirNucPro's interface (`check_interface`)."""


def _described(name: str, get_handle, timeout_s: float) -> dict:
    """A replica's description, asked for (`description`) only once its interface (`describe`) is
    checked. `get_handle`: makes the deployment handle (Serve raises several kinds for a missing app)."""
    try:
        handle = get_handle()
        interface = handle.describe.remote().result(timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - a missing app, a replica that does not answer in time, ...
        raise EmbedError(f"service '{name}' is not running or not answering ({type(e).__name__}: {_line(e)}); "
                         f"virnucpro serve status lists the services") from None
    check_interface(name, interface)
    try:
        return handle.description.remote().result(timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - e.g. a service of this version from before `description`
        raise EmbedError(f"service '{name}' did not describe its model ({type(e).__name__}: {_line(e)}); if an "
                         f"earlier VirNucPro started it, restart it: virnucpro serve stop --name {name}, then "
                         f"virnucpro serve start --name {name} with its model and options") from None


def _line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def check_interface(name: str, info: dict) -> None:
    """Refuse a service started by another VirNucPro: the objects a job and the replicas pickle for each
    other may lack or add fields (`interface_fingerprint`), which would fail midway or, worse, quietly.
    A service from before the fingerprint sends none, and gets the same answer."""
    theirs, ours = info.get("interface"), interface_fingerprint()
    if theirs != ours:
        raise InterfaceMismatch(f"service '{name}' runs a different VirNucPro interface (service: "
                         f"{theirs or 'none, an older VirNucPro'}; this VirNucPro: {ours}): restart it with this "
                         f"VirNucPro: virnucpro serve stop --name {name}, then virnucpro serve start --name {name} "
                         f"with its model and options")


class _Call:
    def __init__(self, send):
        self.send = send

    def remote(self, *args):
        return object_ref(self.send(*args))  # blocks only until a replica accepts it


class _Replicas:
    """Stands in for an actor in the job's pool: each call goes to the service, which routes it to a
    replica; the result is an ObjectRef, so the job's `ray.wait` loop is the same for both."""

    def __init__(self, handle, out_uri: str, outputs: tuple | None):
        self.embed = _Call(lambda batch, attempt: handle.embed.remote(batch, attempt, out_uri, outputs))
        self.prepare = _Call(handle.prepare.remote)
        self.info = _Call(lambda: handle.prepare.remote(None))


def service_pool(name: str, out_uri: str, per_replica: int, outputs: tuple | None = None) -> ActorPool:
    """The job's pool over service `name`: one slot per replica, `per_replica` batches each.
    `outputs`: the job's (repr_layers, include, output_dtype), which the replicas compute for it."""
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=name)
    # the replica count only: service_status would also ask a replica for its labels, which the job's
    # driver already has from describe_service
    app = serve.status().applications.get(name)
    deployment = app.deployments.get(DEPLOYMENT) if app else None
    running = deployment.replica_states.get("RUNNING", 0) if deployment else 1
    # an autoscaling service: as many slots as it may have replicas, so that the job's batches queued at
    # the running ones make Serve start the others (a service of before autoscaling answers no maximum)
    most = handle.describe.remote().result(timeout_s=120).get("max_replicas", 1)
    replicas = max(1, running, most)
    return ActorPool(lambda i: _Replicas(handle, out_uri, outputs), replicas, per_replica, f"service '{name}'",
                     kill=lambda actor: None)  # the replicas are the service's, not the job's
