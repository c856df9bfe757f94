"""Runs a worker method on every rank of one replica: in this process (tp=1) or as Ray actors.

One generic primitive, `call_all(method, *args)`, instead of a stub per method. Every
rank receives the same arguments (the same Step); rank 0's result comes first.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from .config import ModelConfig, WorkerConfig
from .worker import Worker, check_divisible

log = logging.getLogger(__name__)

RELEASE_WAIT_S = 15.0  # how long a new replica waits for a shut-down one's Ray resources to come back
RAY_START_TRIES = 2  # an embedded Ray whose raylet never registered (Ray's 30 s wait; seen on a 2-core VM) gets a second start
DEATH_WAIT_S = 2.0  # how long a failed call waits for the other ranks' calls to say whether one died


class WorkerDied(RuntimeError):
    """A rank's process is gone (killed, crashed, its node lost)."""


class StepTimeout(TimeoutError):
    """A call on the ranks did not return in time (a hung collective, a stuck device)."""


class LocalExecutor:
    """A replica of one rank, in this process. A call that hangs cannot be cut short here: the
    replica's watchdog notices it and the replica is rebuilt beside it."""

    def __init__(self, cfg: WorkerConfig):
        self.tp = 1
        self.worker = Worker(cfg)

    def call_all(self, method: str, *args, timeout: float | None = None) -> list:
        return [getattr(self.worker, method)(*args)]

    def dead_ranks(self) -> list[int]:
        return []

    def abort(self) -> None:
        pass

    def shutdown(self, stop_ray: bool = True) -> None:
        self.worker = None


class WorkerActor:
    """One rank: joins the torch.distributed group, then holds a Worker. Runs inside a Ray actor.

    The actor runs two calls at once (max_concurrency=2): the replica thread's (execute and the
    other calls between steps, one at a time, the same order on every rank) and the adapter
    loader's (read_adapter, which runs no collective), so reading an adapter overlaps steps.
    """

    def __init__(self, cfg: WorkerConfig, rank: int, size: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.cfg, self.rank, self.size, self.threads = cfg, rank, size, threads
        self.worker = None

    def rendezvous_address(self) -> str:
        """A tcp:// address on this node with a free port, for rank 0 to host the group's store."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, init_method: str) -> None:
        import torch
        import torch.distributed as dist

        from .comm import Comm
        from .loader import Shard

        backend = "nccl" if self.cfg.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.size)
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray gives each actor one visible GPU
        self.worker = Worker(self.cfg, Shard(self.rank, self.size), Comm(self.rank, self.size))

    def ping(self) -> int:
        """Answers at once (the actor's third concurrency slot): the watchdog's proof of life; the pid."""
        return os.getpid()

    def call(self, method: str, *args):
        import torch

        if torch.get_num_threads() != self.threads:  # each of the actor's threads keeps its own setting
            torch.set_num_threads(self.threads)
        return getattr(self.worker, method)(*args)

    def stop(self) -> None:
        import torch.distributed as dist

        self.worker = None
        if dist.is_initialized():
            dist.destroy_process_group()


class RayWorkerGroup:
    """A tensor-parallel replica: a placement group of `tp` bundles, one WorkerActor per bundle."""

    def __init__(self, cfg: WorkerConfig, tp: int, ray_address: str | None = None, start_timeout: float = 120.0,
                 cpus_per_rank: float | None = None):
        if ray_address is None:
            keep_ray_local()  # before Ray is imported: it reads these at import time
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        check_divisible(ModelConfig.from_dir(cfg.model_dir), tp)  # before starting anything
        self.tp = tp
        self._pings: dict = {}  # rank -> the ping in flight (dead_ranks)
        self._owns_ray = False
        self._store_dir = None
        self._ray_dir = None
        if not ray.is_initialized():
            self._ray_dir = init_ray(ray_address)
            self._owns_ray = True
        self._ray = ray
        on_gpu = cfg.device.startswith("cuda")
        resource = "GPU" if on_gpu else "CPU"
        total = ray.cluster_resources().get(resource, 0)
        per_rank = 1.0 if on_gpu else (cpus_per_rank or min(1.0, total / tp))
        bundle = {"GPU": 1.0, "CPU": 1.0} if on_gpu else {"CPU": per_rank}
        need = tp * bundle[resource]
        have = ray.available_resources().get(resource, 0)
        # A replica just shut down (a restart, the previous engine in this process) frees its
        # placement group asynchronously: where the cluster holds enough, wait a bounded while for it.
        deadline = time.monotonic() + min(start_timeout, RELEASE_WAIT_S)
        while have + 1e-9 < need <= total + 1e-9 and time.monotonic() < deadline:
            time.sleep(0.1)
            have = ray.available_resources().get(resource, 0)
        if have + 1e-9 < need:
            self.shutdown()
            raise ValueError(f"tp={tp} needs {need:g} {resource}s in Ray, which has {have:g} free")
        # PACK by default: a replica's ranks all-reduce twice per layer, so as few nodes as fit them.
        strategy = cfg.placement_strategy
        self.pg = placement_group([dict(bundle) for _ in range(tp)], strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise ValueError(f"Ray could not place {tp} workers of {bundle} with strategy {strategy} "
                             f"within {start_timeout:.0f}s") from None
        actor_cls = ray.remote(WorkerActor)
        threads = max(1, int((os.cpu_count() or 1) / tp)) if not on_gpu else 1
        env = {"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}} if ray_address is None else None
        self.actors = [
            actor_cls.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), runtime_env=env, max_concurrency=3,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(cfg, rank, tp, threads)
            for rank in range(tp)
        ]
        if ray_address is None:  # one node: a file store, so nothing listens beyond loopback
            self._store_dir = tempfile.mkdtemp(prefix="lorafleet-store-")
            init_method = Path(self._store_dir, "store").as_uri()
        else:
            init_method = ray.get(self.actors[0].rendezvous_address.remote())
        try:
            ray.get([a.start.remote(init_method) for a in self.actors], timeout=start_timeout)
        except Exception:
            self.shutdown()
            raise

    def call_all(self, method: str, *args, timeout: float | None = None) -> list:
        """method(*args) on every rank; raises WorkerDied or StepTimeout (never a Ray dump).

        When a rank dies in a step, the others fail in their next collective (gloo: "connection reset
        by peer"), and that error can come back first: a call that fails is reported as a death when
        another rank's call ends in its actor's death within DEATH_WAIT_S."""
        ray = self._ray
        refs = [a.call.remote(method, *args) for a in self.actors]
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise StepTimeout(f"{method} did not return within {timeout:g} s") from None
        except ray.exceptions.RayActorError:
            raise WorkerDied(f"a worker process died during {method}") from None
        except Exception:
            if self._a_rank_died(refs):
                raise WorkerDied(f"a worker process died during {method}") from None
            raise

    def _a_rank_died(self, refs: list) -> bool:
        """Whether one of these calls ends in its actor's death, waiting at most DEATH_WAIT_S for them."""
        ray = self._ray
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=DEATH_WAIT_S)
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                return True
            except Exception:  # noqa: BLE001 - a rank's own error is not a death
                pass
        return False

    def dead_ranks(self) -> list[int]:
        """Ranks whose process is gone, from pings that never wait behind a step; no waiting here."""
        ray = self._ray
        dead = []
        for rank, actor in enumerate(self.actors):
            ref = self._pings.get(rank)
            if ref is None:
                self._pings[rank] = actor.ping.remote()
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue  # still on its way: alive and busy, or not known dead yet
            try:
                ray.get(ref)
                del self._pings[rank]
            except ray.exceptions.RayActorError:
                dead.append(rank)
        return dead

    def pids(self) -> list[int]:
        return self._ray.get([a.ping.remote() for a in self.actors], timeout=30)

    def abort(self) -> None:
        """Kills every rank now, so that a call stuck in a collective returns (with WorkerDied)."""
        for a in self.actors:
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass

    def adopt_ray(self, other: "RayWorkerGroup") -> None:
        """Takes over stopping the embedded Ray that `other` started (a rebuilt replica replaces it)."""
        self._owns_ray, self._ray_dir = other._owns_ray, other._ray_dir
        other._owns_ray, other._ray_dir = False, None

    def shutdown(self, stop_ray: bool = True) -> None:
        ray = self._ray if hasattr(self, "_ray") else None
        if ray is None:
            return
        for a in getattr(self, "actors", []):
            try:
                ray.get(a.stop.remote(), timeout=30)
            except Exception:  # a dead actor needs no stopping
                pass
            ray.kill(a)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
        if self._owns_ray and stop_ray:
            ray.shutdown()
            self._owns_ray = False
            if self._ray_dir:
                shutil.rmtree(self._ray_dir, ignore_errors=True)
        if self._store_dir:
            for f in Path(self._store_dir).iterdir():
                f.unlink()
            os.rmdir(self._store_dir)
            self._store_dir = None


def keep_ray_local() -> None:
    """An embedded Ray listens on loopback only and needs no auth token.

    Ray reads these when it is first imported, in this process and in the ones it starts;
    a coordinator that joins a real cluster (--ray-address) leaves them alone.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def init_ray(address: str | None, num_cpus: int | None = None) -> str | None:
    """Joins `address`, or starts an embedded Ray bound to loopback; returns the embedded one's folder."""
    if address is None:
        keep_ray_local()
    import ray

    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return None
    for attempt in range(1, RAY_START_TRIES + 1):
        started = time.monotonic()
        folder = tempfile.mkdtemp(prefix="lorafleet-ray-")
        try:
            ray.init(
                num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                _temp_dir=folder, configure_logging=False,
            )
        except Exception as e:
            ray.shutdown()
            kill_processes_naming(folder)  # a failed start leaves its GCS and helpers running
            shutil.rmtree(folder, ignore_errors=True)
            if attempt == RAY_START_TRIES:
                raise
            log.warning("the embedded Ray did not start in %.0fs (%s); starting it again",
                        time.monotonic() - started, str(e).splitlines()[0] if str(e) else type(e).__name__)
            continue
        log.info("started an embedded Ray on 127.0.0.1 in %.1fs", time.monotonic() - started)
        return folder


def kill_processes_naming(folder: str) -> None:
    """Kills the processes whose command line names `folder` (Linux /proc): those of an embedded Ray
    that failed to start, which name its temp folder, and which nothing else would stop."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if folder.encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone meanwhile, or not ours to kill
            continue


def make_executor(cfg: WorkerConfig, tp: int = 1, ray_address: str | None = None):
    if tp == 1 and ray_address is None:
        return LocalExecutor(cfg)
    return RayWorkerGroup(cfg, tp, ray_address)
