"""The path a KubeRay deployment takes, on loopback: a Ray head and a second Ray node started as their
own processes (`ray start`), then `lorafleet serve --ray-address` places each replica's tp workers
through a placement group across the nodes, serves the greedy tokens of tp=1, and leaves no actor
or placement group behind."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray
from engines import generate, make_engine
from servers import ServerProcess

from lorafleet.client.sdk import Client

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
# Every Ray listener on 127.0.0.1, no auth token, gloo over loopback (tests/conftest.py sets the first
# two for this process; the Ray nodes and the server get them explicitly).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "GLOO_SOCKET_IFNAME": "lo",
                "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
PROMPTS = [([5, 17, 33, 2, 41], 8), ([101, 7, 7, 250, 3, 9, 12], 6)]
ADAPTER = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.2", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayNode:
    """`ray start --block` in its own session, so that stopping it reaches every process it started."""

    def __init__(self, temp_dir: Path, name: str, ip: str, head_address: str | None, cpus: int, log: Path):
        gcs, client, agent, agent_grpc, metrics, env_agent, node_manager, object_manager = free_ports(8)
        self.address = head_address or f"{ip}:{gcs}"
        cmd = [RAY, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}", "--num-gpus=0",
               f"--resources={json.dumps({name: 1})}", "--object-store-memory=100000000",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               "--disable-usage-stats"]
        if head_address is None:
            cmd += ["--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false",
                    f"--temp-dir={temp_dir}"]
        else:
            cmd += [f"--address={head_address}"]
        # Ray's cluster mode (a second node needs it) swaps "127.0.0.1" for the host's outward address;
        # other loopback addresses it keeps, so the nodes live on 127.0.0.2 and 127.0.0.3.
        env = dict(os.environ, **dict(LOOPBACK_ENV, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1"))
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # anything of its session still alive
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_using(temp_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names this test's Ray folder: the Ray processes it started."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def wait_for(condition, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes of one CPU each (custom resources node_a, node_b), and a driver in this process."""
    # Short: Ray's socket paths live under it and must stay under the kernel's 107 characters.
    temp_dir = Path(f"/tmp/lf-mn-{os.getpid()}")
    logs = Path(f"/tmp/lf-mn-logs-{os.getpid()}")
    logs.mkdir(exist_ok=True)
    nodes = []
    try:
        nodes.append(RayNode(temp_dir, "node_a", "127.0.0.2", None, 1, logs / "head.log"))
        address = nodes[0].address
        wait_for(lambda: subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, timeout=60,
                                        env=dict(os.environ, **LOOPBACK_ENV)).returncode == 0,
                 90, f"the Ray head on {address} did not answer")
        nodes.append(RayNode(temp_dir, "node_b", "127.0.0.3", address, 1, logs / "node_b.log"))
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 90, "the second Ray node did not join")
        yield address, {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node_"))
                        for n in ray.nodes() if n["Alive"]}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(nodes):
            node.stop()
        leftovers = processes_using(temp_dir)
        for p in leftovers:
            p.kill()
        subprocess.run(["rm", "-rf", str(temp_dir)], timeout=60)
        assert not leftovers, f"Ray processes outlived their node: {[p.pid for p in leftovers]}"


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory, adapter_factory):
    """llama_gqa's shape (4 query heads, 2 KV heads: tp=2 divides it), an adapter, and tp=1's tokens."""
    import peers

    root = tmp_path_factory.mktemp("multinode")
    model = peers.make_tiny_model(root / "model", model_type="llama", num_heads=4, num_kv_heads=2, seed=2)
    adapters = root / "adapters"
    adapter_factory(model, adapters / "all7", seed=77, **ADAPTER)
    requests = [(adapter, prompt, n) for adapter in (None, "all7") for prompt, n in PROMPTS]
    engine = make_engine(model, adapters)
    try:
        reference = generate(engine, requests)
    finally:
        engine.shutdown()
    return model, adapters, requests, reference


def placement(node_names: dict[str, str]) -> list[list[str]]:
    """The node (by its custom resource) of every bundle of every live placement group."""
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] in ("CREATED", "PENDING", "RESCHEDULING")]
    return [[node_names.get(g["bundles_to_node_id"].get(i), "?") for i in sorted(g["bundles"])] for g in groups]


def live_actors() -> list[str]:
    return [a["ActorClassName"] for a in ray._private.state.actors().values() if a["State"] != "DEAD"]


def serve_and_check(address, node_names, model_and_reference, *args: str) -> list[list[str]]:
    model, adapters, requests, reference = model_and_reference
    server = ServerProcess("--model", str(model), "--adapters", str(adapters), "--ray-address", address,
                           "--pool-bytes", "16MiB", "--dtype", "float32", *args, start_timeout=240)
    try:
        placed = placement(node_names)
        with Client(server.target, timeout=120) as client:
            for (adapter, prompt, n), expected in zip(requests, reference):
                chunks = list(client.generate(adapter=adapter, prompt_token_ids=prompt, max_new_tokens=n, ignore_eos=True))
                assert [t for c in chunks for t in c.token_ids] == expected, (args, adapter, prompt)
    finally:
        assert server.stop(timeout=120) == 0
    wait_for(lambda: not placement(node_names) and not live_actors(), 60,
             f"placement groups {placement(node_names)} or actors {live_actors()} were left behind")
    return placed


def test_tp2_across_two_ray_nodes_equals_tp1(cluster, model_and_reference):
    address, node_names = cluster
    # One CPU per node and one per rank: even PACK must put the two ranks on different nodes.
    placed = serve_and_check(address, node_names, model_and_reference, "--tp", "2", "--placement-strategy", "PACK")
    assert [sorted(g) for g in placed] == [["node_a", "node_b"]]


def test_two_replicas_place_each_group_by_the_strategy(cluster, model_and_reference):
    address, node_names = cluster
    # 4 ranks of half a CPU on two one-CPU nodes: SPREAD puts each replica's two ranks on both nodes,
    # PACK each replica's two ranks on one node.
    spread = serve_and_check(address, node_names, model_and_reference, "--tp", "2", "--replicas", "2",
                             "--placement-strategy", "SPREAD")
    assert [sorted(g) for g in spread] == [["node_a", "node_b"]] * 2
    packed = serve_and_check(address, node_names, model_and_reference, "--tp", "2", "--replicas", "2",
                             "--placement-strategy", "PACK")
    assert sorted(sorted(g) for g in packed) == [["node_a", "node_a"], ["node_b", "node_b"]]
