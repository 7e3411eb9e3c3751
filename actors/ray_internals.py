"""The private Ray APIs VirNucPro needs, each behind one function, where no public API does the job.

A Ray upgrade may move or rename any of them; `tests/test_ray_internals.py` calls each one against the
installed Ray and fails, naming it, if it changed. Nothing else in the project touches `ray._private`.
"""

from __future__ import annotations


def current_node():
    """This process's Ray node object (its raylet, GCS, ... processes), or None: a Ray Client connection
    has none. `cluster.session.start_ray` waits until Ray drops it, which `ray.shutdown()` does last."""
    from ray._private import worker

    return getattr(worker, "_global_node", None)


def object_ref(response):
    """The ObjectRef of a Serve DeploymentResponse, so that a job's `ray.wait` loop waits on a service's
    replicas as on its own actors. Blocks only until a replica has accepted the call."""
    return response._to_object_ref_sync()


def token_auth_enabled() -> bool:
    """Whether this process's Ray uses token authentication (False on a Ray without it)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return False
    return bool(is_token_auth_enabled())


def token_valid(header: str) -> bool | None:
    """Whether an HTTP Authorization header carries the cluster's token (Ray's own check, the one its
    dashboard and job API apply); None on a Ray without token authentication."""
    try:
        from ray._private.authentication.authentication_utils import validate_request_token
    except ImportError:
        return None
    return bool(header) and bool(validate_request_token(header))


__all__ = ["current_node", "object_ref", "token_auth_enabled", "token_valid"]
