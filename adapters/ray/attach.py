"""Attaching to a running Ray: failing fast, and saying what to fix.

``ray.init(address=...)`` reports a cluster that refuses this driver (token
authentication, on by default on every Ray 2.60 head not on loopback) or an
address it cannot use from this host only after a long wait, with a bare
ConnectionError or a timeout.  A quick probe before ``ray.init`` turns the
common cases into an immediate :class:`BackendStartError` naming the fix, and
a failure ``ray.init`` reports itself gets a hint where one applies.
"""

from __future__ import annotations

import os
import socket

import ray
import ray.exceptions as rex

from ...errors import BackendStartError
from .state import log

__all__ = ["check_attach", "start_error"]

_TOKEN_FIX = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the cluster's token file "
    "(examples/slurm/ray-cluster.sbatch writes it to $RAY_JOB_DIR/auth_token), or "
    "put the token itself in RAY_AUTH_TOKEN"
)


def start_error(address: str | None, exc: BaseException) -> BackendStartError:
    """Why Ray could not be started (``address`` None) or attached."""
    hint = _attach_hint(address, exc, _auth_mode_is_token()) if address else None
    return BackendStartError(
        f"Ray could not be {'attached' if address else 'started'}: "
        f"{type(exc).__name__}: {exc}" + (f"; {hint}" if hint else "")
    )


def _client_refuses_token(target: str) -> bool:
    """Whether the Ray Client server at ``target`` refuses this driver's token
    (or its lack of one): a PING, which Ray's proxy answers itself, through the
    channel Ray Client would use.  Anything but a refusal is left to Ray."""
    try:  # Ray's internals: without them, Ray's own wait and words
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc
    except ImportError:
        return False
    ping = ray_client_pb2.ClusterInfoRequest(  # type: ignore[attr-defined]
        type=ray_client_pb2.ClusterInfoType.PING  # type: ignore[attr-defined]
    )
    try:
        channel = init_grpc_channel(target, asynchronous=False)
        try:
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=5)
        finally:
            channel.close()
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    except Exception:
        log.debug("probing the Ray Client server at %s failed", target, exc_info=True)
    return False


def _auth_mode_is_token() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def check_attach(address: str) -> None:
    """Fail at once, saying what to do, where ``ray.init(address=...)`` would
    fail only after a long wait with a bare ConnectionError.

    * A cluster with token authentication on (any Ray 2.60 head not on loopback)
      refuses a driver without its token, or with another: Ray retries for 20 s
      (``HOST:PORT``) or 30 s (``ray://``, whose timeout never names the token).
      One request tells, in milliseconds.
    * ``HOST:PORT`` attaches through a raylet on this host (Ray finds it with
      ``ps``); on a host where no Ray node runs, such as a Slurm login node, Ray
      looks for one for 60 s.  Ray Client (``ray://``) needs no local raylet.

    Only when the address answers on TCP: an address nobody listens on is left to
    ``ray.init`` and its own wait; so is ``auto``.
    """
    if address == "auto":
        return
    scheme, _, rest = address.rpartition("://")
    host, sep, port = rest.partition("/")[0].rpartition(":")
    if not sep:
        host, port = rest.partition("/")[0], "10001" if scheme == "ray" else ""
    if not port.isdigit() or scheme not in ("", "ray"):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except OSError:
        return
    if scheme != "ray":
        _check_gcs(address, host)
    elif _client_refuses_token(f"{host}:{port}"):
        raise BackendStartError(
            f"Ray could not be attached: "
            f"{_token_refused(address, _auth_mode_is_token())}"
        )


def _check_gcs(address: str, host: str) -> None:
    """``HOST:PORT``: the GCS accepts this driver's token, and a Ray node runs
    on this host for ``ray.init`` to attach through."""
    try:  # Ray's internals: without them, Ray's own wait and words
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        GcsClient(address=address)
    except AuthenticationError:
        raise BackendStartError(
            f"Ray could not be attached: "
            f"{_token_refused(address, _auth_mode_is_token())}"
        ) from None
    except Exception:  # anything else: ray.init reports it in its own words
        log.debug("probing the GCS at %s failed", address, exc_info=True)
        return
    find_node_ids = getattr(ray._private.services, "find_node_ids", None)
    if find_node_ids is not None and not find_node_ids():
        raise BackendStartError(
            f"Ray could not be attached: address={address!r} attaches through a "
            "Ray node on this host, and none runs here (a Slurm login node has "
            "none): run the driver on a node of the Ray cluster (for a cluster in "
            "a Slurm job: srun --overlap --jobid=JOB -w HEAD_NODE python ...), or "
            f"attach through Ray Client: address='ray://{host}:10001'"
        )


def _token_refused(address: str, mode_is_token: bool) -> str:
    """What to do when the cluster at ``address`` refused this driver's token."""
    if mode_is_token:
        why = (
            "refused this driver's token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token, in that order): it is not the cluster's"
        )
    else:
        why = "has token authentication on, and this driver sent no token"
    return f"the Ray cluster at {address} {why}; {_TOKEN_FIX}"


def _attach_hint(address: str, exc: BaseException, mode_is_token: bool) -> str | None:
    """A sentence saying what to fix when ``ray.init(address=...)`` failed, or None.

    Ray reports a refused token as a bare ``ConnectionError`` after retrying for
    20 s, with the AuthenticationError only as text inside its cause; through
    Ray Client it times out after 30 s without naming authentication at all.
    """
    seen: BaseException | None = exc
    while seen is not None:
        refused = "InvalidAuthToken" in str(seen)
        if refused or isinstance(seen, rex.AuthenticationError):
            return _token_refused(address, mode_is_token)
        seen = seen.__cause__ or seen.__context__
    if address.startswith("ray://") and not mode_is_token:
        return (
            f"if the Ray cluster at {address} uses token authentication (Ray 2.60 "
            f"turns it on for every head not on loopback), {_TOKEN_FIX}"
        )
    return None
