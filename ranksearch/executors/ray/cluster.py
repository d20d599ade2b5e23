"""The Ray cluster of a search: starting a local one or joining a running one, checking that
it can run a trial, and reading a cluster's address (with help for token authentication).

A local cluster listens on the loopback address unless asked otherwise, so nothing off this
machine can reach it (Ray's own default is every interface)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterator
from typing import Any

import ray
from ray._private import ray_constants
from ray.exceptions import AuthenticationError

from ...errors import RankSearchError

_AUTH_HELP = (
    "The cluster uses token authentication: set RAY_AUTH_MODE=token here and make the cluster's "
    "token available (`ray get-auth-token` on the head node; copy it to ~/.ray/auth_token or set "
    "RAY_AUTH_TOKEN)."
)
_QUIET = {"logging_level": logging.ERROR, "log_to_driver": False}


def join_cluster(address: str) -> None:
    """Join the running cluster at ``address`` ("host:port" or "auto")."""
    _check_reachable(address)
    try:
        ray.init(address=address, **_QUIET)
    except Exception as e:  # ConnectionError, auth and version errors vary by release
        raise RankSearchError(
            f"cannot join the Ray cluster at {address!r} ({type(e).__name__}: {e}). "
            + (_AUTH_HELP if isinstance(e.__cause__, AuthenticationError) else
               "Start one with `ray start --head` on the head node (and `ray start "
               "--address=HEAD:6379` on the others), or leave address unset to start a "
               "local cluster.")
        ) from e


LOOPBACK = "127.0.0.1"


def check_host(host: str) -> str:
    """``host`` if it is an IP address a local cluster can listen on (not 0.0.0.0 or ::)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or address.is_unspecified:
        raise RankSearchError(
            f"host must be an IP address of this machine for the local Ray cluster to listen "
            f"on ({LOOPBACK}, the default, or its network address to let other machines join), "
            f"got {host!r}"
        )
    return host


def local_init_options(num_cpus: int | None, object_store_memory: int, temp_dir: str,
                       host: str | None = None) -> dict[str, Any]:
    """The `ray.init` options of a local cluster listening on ``host`` (None: loopback)."""
    return {"num_cpus": num_cpus, "include_dashboard": False,
            "object_store_memory": object_store_memory, "_temp_dir": temp_dir,
            "_node_ip_address": check_host(host or LOOPBACK), **_QUIET}


@contextlib.contextmanager
def _loopback_node(host: str) -> Iterator[None]:
    """Ray turns a loopback node address into the machine's network address (and then listens
    on every interface) unless it runs as a single-machine cluster; make it one while it starts
    on a loopback ``host``."""
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = not ipaddress.ip_address(host).is_loopback and before
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def start_cluster(num_cpus: int | None, object_store_memory: int, temp_dir: str,
                  host: str | None = None) -> None:
    """Start a local cluster of ``num_cpus`` CPUs (None: all), with an object store of
    ``object_store_memory`` bytes and its files in ``temp_dir``, listening on ``host`` (None:
    the loopback address, reachable from this machine only)."""
    options = local_init_options(num_cpus, object_store_memory, temp_dir, host)
    try:
        with _loopback_node(options["_node_ip_address"]):
            ray.init(**options)
    except Exception as e:
        raise RankSearchError(
            f"cannot start a local Ray cluster ({type(e).__name__}: {e}); check that "
            f"{temp_dir} is writable (temp_dir) and the memory is available"
        ) from e


def resource_shortfall(cpus_per_trial: float, gpus_per_trial: float) -> str | None:
    """Why no live node of the connected cluster can run a trial of ``cpus_per_trial`` CPUs and
    ``gpus_per_trial`` GPUs (None when one can)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpus_per_trial and n.get("GPU", 0) >= gpus_per_trial
           for n in nodes):
        return None
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    return (
        f"no node of the Ray cluster can run a trial of {cpus_per_trial} CPU(s) and "
        f"{gpus_per_trial} GPU(s); the largest has {largest.get('CPU', 0):g} CPU(s) and "
        f"{largest.get('GPU', 0):g} GPU(s). Lower cpus_per_trial / gpus_per_trial or add "
        "nodes."
    )


def _host_port(address: str) -> tuple[str, int]:
    """The host and port of a Ray address ("host:port", optionally with a scheme)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RankSearchError(
            f"Ray address {address!r} is not of the form host:port (e.g. 10.0.0.1:6379) or "
            "'auto'"
        )
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    """Fail fast, naming the address, when nothing listens there ("auto" is looked up by Ray)."""
    if address == "auto":
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise RankSearchError(
            f"cannot reach a Ray cluster at {address} ({e}). Start one with `ray start --head "
            f"--port={port}` on {host} (and `ray start --address={host}:{port}` on the other "
            "nodes), check the host and firewall, or leave address unset to start a local "
            "cluster."
        ) from None
