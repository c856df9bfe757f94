"""`lorafleet finetune --push-to`: the finished adapter is loaded into a running server, which
serves it (token for token like PEFT) without a restart; a second push replaces the first."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
from peers import clear_peer_cache, encode, peft_greedy
from servers import ServerProcess

from lorafleet.client.sdk import Client
from lorafleet.coordinator.cli import main

pytestmark = pytest.mark.slow
TOKEN = "finetune-admin-token"


@pytest.fixture(scope="module")
def server(ft_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft_push")
    (tmp / "adapters").mkdir()
    (tmp / "token").write_text(TOKEN + "\n")
    srv = ServerProcess("--model", str(ft_model), "--adapters", str(tmp / "adapters"), "--pool-bytes", "4MiB",
                        "--admin-token-file", str(tmp / "token"), "--dtype", "float32")
    srv.tmp, srv.model = tmp, ft_model
    yield srv
    assert srv.stop() == 0


def _finetune(server, task_file, seed: int, *extra) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["finetune", "--model", str(server.model), "--data", str(task_file),
                     "--output", str(server.tmp / "adapters" / "fresh"), "--rank", "4", "--max-steps", "20",
                     "--lr", "1e-2", "--seed", str(seed), "--quiet", "--overwrite", "--push-to", server.target, *extra])
    return code, err.getvalue()


def _greedy(server, prompt) -> list[int]:
    with Client(server.target, timeout=60) as c:
        return list(c.complete(adapter="fresh", prompt_token_ids=prompt, max_new_tokens=6, ignore_eos=True).token_ids)


def test_push_makes_the_adapter_servable_without_restart(server, ft_model, task_file):
    pid = server.proc.pid
    with Client(server.target, timeout=60) as c:
        assert "fresh" not in [a.name for a in c.list_adapters()]
    prompt = encode("item 5:")

    code, err = _finetune(server, task_file, 1, "--admin-token-file", str(server.tmp / "token"))
    assert code == 0, err
    assert f"loaded adapter 'fresh' on {server.target}" in err
    with Client(server.target, timeout=60) as c:
        (info,) = [a for a in c.list_adapters() if a.name == "fresh"]
    assert info.rank == 4 and info.residence != "disk"  # loaded by the push, not waiting on disk
    first = _greedy(server, prompt)
    assert first == peft_greedy(ft_model, server.tmp / "adapters" / "fresh", prompt, 6)
    old = peft_greedy(ft_model, server.tmp / "adapters" / "fresh", [9, 10, 11], 6)

    # Train again (another seed, so other weights) and push: the server now serves the new weights.
    code, err = _finetune(server, task_file, 2, "--admin-token-file", str(server.tmp / "token"))
    assert code == 0, err
    assert "replaced adapter 'fresh'" in err
    report = json.loads((server.tmp / "adapters" / "fresh" / "finetune_report.json").read_text())
    assert report["pushed"]["replaced"] is True and report["pushed"]["server"] == server.target
    clear_peer_cache()  # the oracle caches models by folder, and the folder now holds other weights
    new = peft_greedy(ft_model, server.tmp / "adapters" / "fresh", [9, 10, 11], 6)
    assert new != old and _greedy(server, [9, 10, 11]) == new
    assert server.proc.poll() is None and server.proc.pid == pid  # the same process all along


def test_a_refused_push_says_why_and_keeps_the_adapter(server, ft_model, task_file, tmp_path):
    (tmp_path / "wrong").write_text("not-the-token\n")
    code, err = _finetune(server, task_file, 3, "--admin-token-file", str(tmp_path / "wrong"), "--push-name", "other")
    assert code == 2
    assert f"lorafleet finetune: error: loading the adapter into {server.target} failed: UNAUTHENTICATED" in err
    assert "the adapter is saved in" in err and (server.tmp / "adapters" / "fresh" / "adapter_model.safetensors").is_file()
