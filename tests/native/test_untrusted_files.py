"""The flow loader on files an attacker chooses: a FIFO or a folder is refused at once (never a
blocking read), a full-rank subspace is refused before it is orthonormalised, a flow of another
width is refused before any tensor is validated, and validation stays linear in the file's size."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from innsteer_local import Flow, ModelInfo
from innsteer_local.choices import MAX_RANK
from innsteer_local.errors import FlowFormatError, FlowMismatchError
from innsteer_local.flow import random_flow
from innsteer_local.flow.ops import Subspace
from innsteer_local.flow.site import Site
from innsteer_local.runtime.native import NativeFlow

MODEL = ModelInfo("SmolLM2", "llama", 576, 30)


def subspace_flow(path, n_embd: int, rank: int, sites: int = 1) -> None:
    """Orthonormal bases of the given rank at `sites` layers, nothing else: all validation cost."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n_embd, rank)))
    Flow(model=ModelInfo("x", "llama", n_embd, max(30, sites)),
         sites=[Site(layer=i, ops=[Subspace(basis=q.T.astype(np.float32))], delta=np.zeros(rank, np.float32))
                for i in range(sites)]).save(path)


def load_within(path, seconds: float, model=MODEL):
    """NativeFlow(path) on a thread: its exception (or None), failing if it takes longer."""
    out: list = []

    def run():
        try:
            NativeFlow(path, model).close()
            out.append(None)
        except Exception as e:  # noqa: BLE001  (the verdict is the test's to check)
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"loading {path} took longer than {seconds} s"
    return out[0]


def test_a_fifo_and_a_folder_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "flow.gguf"
    os.mkfifo(fifo)
    err = load_within(fifo, 5)  # a blocking open would wait here until someone writes to the FIFO
    assert isinstance(err, FlowFormatError) and "not a regular file" in str(err)
    err = load_within(tmp_path, 5)
    assert isinstance(err, FlowFormatError) and "not a regular file" in str(err)


def test_full_rank_and_wrong_width_are_refused_before_validation(tmp_path):
    full = tmp_path / "full.gguf"
    subspace_flow(full, 1448, 1448)  # 8 MiB: a full-rank basis cost minutes to check before
    assert full.stat().st_size >= 8 << 20
    t = time.perf_counter()
    for model in (MODEL, None):
        err = load_within(full, 5, model)
        assert isinstance(err, FlowMismatchError if model else FlowFormatError), err
    assert time.perf_counter() - t < 1.0
    assert "does not fit the model's n_embd 576" in str(load_within(full, 5))
    assert f"rank 1448 outside 1..{MAX_RANK}" in str(load_within(full, 5, None))
    with pytest.raises(FlowFormatError, match=f"rank 1448 outside 1..{MAX_RANK}"):
        Flow.load(full)  # the Python reader refuses the same file with the same words


def test_validation_is_linear_in_the_file_size(tmp_path):
    """The most a legal file can make the loader do: 8 MiB of rank-MAX_RANK bases."""
    many = tmp_path / "many.gguf"
    subspace_flow(many, 576, MAX_RANK, sites=14)
    assert many.stat().st_size >= 7 << 20
    t = time.perf_counter()
    assert load_within(many, 10) is None
    # a generous bound for a loaded CI machine; it takes about 0.3 s on 2 idle cores
    assert time.perf_counter() - t < 3.0


def test_a_layer_the_model_lacks_is_refused_at_load(tmp_path):
    path = tmp_path / "deep.gguf"
    random_flow(ModelInfo("SmolLM2", "llama", 576, 60), [45], rank=8, blocks=1, hidden=8).save(path)
    err = load_within(path, 5)
    assert isinstance(err, FlowMismatchError) and "layer 45 is out of range" in str(err)


def test_readers_agree_on_a_nearly_orthonormal_basis(tmp_path):
    """f16 storage leaves a basis slightly off: both readers accept it; a skewed one both refuse."""
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(576, 64)))
    for scale, ok in ((1.0 + 1e-3, True), (1.2, False)):
        basis = q.T.astype(np.float32).copy()
        basis[0] *= scale
        path = tmp_path / f"b{scale}.gguf"
        Flow(model=MODEL, sites=[Site(layer=3, ops=[Subspace(basis=basis)], delta=np.ones(64, np.float32))]).save(path)
        native_ok = load_within(path, 5) is None
        try:
            Flow.load(path)
            python_ok = True
        except FlowFormatError:
            python_ok = False
        assert native_ok == python_ok == ok, (scale, native_ok, python_ok)
