"""A model split across two rpc-servers on loopback (llama.cpp's RPC backend), steered: the same
text and logits as the local model, with the flow's layer held by a remote backend.

Needs llama-cpp-python built with the RPC backend and rpc-server built from the same llama.cpp
(quickstart.sh does both: innsteer_local/runtime/llama_build.py install --rpc, scripts/build_rpc_server.sh)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from innsteer_local.runtime import registry, rpc

RPC_SERVER = Path(os.environ.get("INNSTEER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                  / "innsteer-local") / "bin" / "rpc-server"
pytestmark = [
    pytest.mark.skipif(not rpc.supported(), reason="llama.cpp built without the RPC backend "
                       "(python innsteer_local/runtime/llama_build.py install --rpc)"),
    pytest.mark.skipif(not RPC_SERVER.exists(), reason=f"no rpc-server at {RPC_SERVER} (scripts/build_rpc_server.sh)"),
]
PROMPT = b"The lighthouse keeper wrote in the log that the storm"
LAYER = 15  # the shipped honesty flow's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers():
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([str(RPC_SERVER), "-H", "127.0.0.1", "-p", str(p), "-t", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for p in ports]
    try:
        for p in ports:
            deadline = time.time() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", p), timeout=1).close()
                    break
                except OSError:
                    assert time.time() < deadline, "rpc-server did not come up"
                    time.sleep(0.2)
        yield [f"127.0.0.1:{p}" for p in ports]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def logits(llm, tokens) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def test_steering_across_two_rpc_servers_equals_the_local_model(servers, model_path):
    from innsteer_local.runtime.steered import SteeredLlama

    honesty = registry.shipped_flows("smollm2-135m")["honesty"]
    local = SteeredLlama(str(model_path), n_ctx=256, logits_all=True, seed=0, verbose=False)
    remote = SteeredLlama(str(model_path), n_ctx=256, logits_all=True, seed=0, verbose=False, rpc=servers)
    try:
        # llama.cpp's own layer assignment (its load log): the layers are split across both
        # servers, and the flow's layer is held by one of them, not by this process's CPU
        devices = remote.layer_devices
        assert set(devices.values()) == {"RPC0", "RPC1"} or set(devices.values()) >= {*remote.rpc_devices}
        assert devices[LAYER].startswith("RPC"), devices
        tokens = local.tokenize(PROMPT)
        base = logits(local, tokens)
        assert np.array_equal(logits(remote, tokens), base)
        greedy = dict(max_tokens=16, temperature=0.0)
        assert remote.create_completion("The sea is", **greedy)["choices"][0]["text"] == \
            local.create_completion("The sea is", **greedy)["choices"][0]["text"]
        for llm in (local, remote):
            llm.add_flow(honesty, strength=1.5)
        steered = logits(local, tokens)
        assert np.abs(steered - base).max() > 0.5, "the flow must move the logits"
        # the callback on the host; the flow as a ggml graph on this process's CPU; and on the first
        # rpc-server itself (its device, the flow's weights uploaded there)
        for path in ("host", "cpu-graph", "device"):
            remote.native_steerer.set_path(path, min_rows=1)
            assert np.array_equal(logits(remote, tokens), steered), path  # same kernels, same numbers
            if path == "device":
                assert remote.native_steerer.device_name.startswith("RPC"), remote.native_steerer.device_name
                assert remote.native_steerer.rows_on_device > 0
        assert remote.steering_stats["rows_steered"] > 0
        assert remote.create_completion("The sea is", **greedy)["choices"][0]["text"] == \
            local.create_completion("The sea is", **greedy)["choices"][0]["text"]
    finally:
        remote.close()
        local.close()


def test_an_unreachable_server_is_a_clear_error(model_path):
    from innsteer_local.errors import InnsteerError
    from innsteer_local.runtime.steered import SteeredLlama

    with pytest.raises(InnsteerError, match=r"RPC server 127\.0\.0\.1:\d+ does not answer"):
        SteeredLlama(str(model_path), n_ctx=128, verbose=False, rpc=f"127.0.0.1:{free_port()}")
    with pytest.raises(InnsteerError, match="is not HOST:PORT"):
        rpc.parse_endpoints("localhost")
