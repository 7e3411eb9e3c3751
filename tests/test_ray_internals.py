"""The private Ray APIs behind `actors.ray_internals`, checked against the installed Ray: a Ray upgrade that
moves or renames one fails here, naming it, instead of breaking a run quietly."""

from __future__ import annotations

import importlib

import pytest

from actors import ray_internals


def test_the_process_node_appears_with_ray_and_goes_with_its_shutdown():
    import ray

    assert not ray.is_initialized() and ray_internals.current_node() is None
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        node = ray_internals.current_node()
        assert node is not None and node.address_info["raylet_socket_name"]  # the node this process started
    finally:
        ray.shutdown()
    assert ray_internals.current_node() is None  # what cluster.session.start_ray's thread waits for


def test_a_serve_response_still_gives_its_object_ref():
    from ray.serve.handle import DeploymentResponse

    assert callable(getattr(DeploymentResponse, "_to_object_ref_sync", None)), \
        "Ray Serve's DeploymentResponse._to_object_ref_sync is gone: cluster/service.py's pool needs another way"


@pytest.mark.parametrize("name", ["is_token_auth_enabled", "validate_request_token"])
def test_rays_token_checks_are_where_the_wrappers_look(name):
    module = importlib.import_module("ray._private.authentication.authentication_utils")
    assert callable(getattr(module, name, None)), f"ray._private.authentication.authentication_utils.{name} moved"
    assert isinstance(ray_internals.token_auth_enabled(), bool)
    assert ray_internals.token_valid("") is False  # no header: never valid
