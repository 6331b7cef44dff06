"""innsteer_flow_get_info / innsteer_flow_get_site_info from C (tests/native/c/flow_info.c, built
from the library sources under AddressSanitizer and UBSan): every shipped flow describes itself as
the Python reader reads it, a tiny linear flow reads back what was written, and descriptive strings
that are not valid UTF-8, not strings, or too long are refused with the key named. No model is
loaded."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from innsteer_local import Flow, FlowFormatError, ModelInfo
from innsteer_local.flow import read_flow
from innsteer_local.flow.gguf import ARRAY, U32, parse

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHIPPED = sorted((ROOT / "models" / "flows").glob("*/*.gguf"))
STRING_KEYS = ("general.name", "innsteer.behavior", "innsteer.method", "innsteer.model.name",
               "innsteer.model.architecture", "innsteer.provenance")
MAX_META_STRING = 4096  # native/src/limits.h


@pytest.fixture(scope="module")
def flow_info(tmp_path_factory, compile_c, sources) -> Path:
    exe = tmp_path_factory.mktemp("info") / "flow_info"
    return compile_c(exe, "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                     str(HERE / "c" / "flow_info.c"), *sources, "-lm", "-lpthread", "-ldl")


def info(exe: Path, *paths: Path) -> list[dict]:
    proc = subprocess.run([str(exe), *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]  # every promise of the API held
    return [json.loads(line) for line in proc.stdout.splitlines()]


def tiny_flow(**meta) -> Flow:
    v = np.arange(1, 9, dtype=np.float32)
    fields = dict(name="tiny", behavior="politeness", method="mean-diff", default_strength=2.5)
    fields.update(meta)
    return Flow.linear({2: v}, ModelInfo("tiny-model", "llama", 8, 4), **fields)


def rewrite(src: Path, dst: Path, set_kv: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a GGUF file with keys replaced ({key: (gguf value type, value)}) or dropped."""
    import gguf

    g = parse(src.read_bytes())
    w = gguf.GGUFWriter(str(dst), g.kv["general.architecture"].value)
    for key, v in g.kv.items():
        if key == "general.architecture" or key in drop:
            continue
        vtype, value = (set_kv or {}).get(key, (v.type, v.value))
        if vtype == ARRAY:
            w.add_key_value(key, [int(x) for x in value], gguf.GGUFValueType.ARRAY,
                            sub_type=gguf.GGUFValueType(v.elem_type))
        else:
            w.add_key_value(key, value, gguf.GGUFValueType(vtype))
    for name, t in g.tensors().items():
        w.add_tensor(name, np.ascontiguousarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def patch(path: Path, old: bytes, new: bytes) -> Path:
    """Replaces the one occurrence of old by new (same length: every offset stays valid)."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_flow_info_equals_python_reader(flow_info, path):
    (c,) = info(flow_info, path)
    py = read_flow(path)
    assert c["status"] == "ok", c
    assert (c["name"], c["behavior"], c["method"]) == (py.name, py.behavior, py.method)
    assert (c["model_name"], c["model_architecture"]) == (py.model.name, py.model.architecture)
    assert (c["model_n_embd"], c["model_n_layer"]) == (py.model.n_embd, py.model.n_layer)
    assert c["n_sites"] == len(py.sites)
    assert np.float32(c["default_strength"]) == np.float32(py.default_strength)
    # the JSON text is handed over unparsed; it parses to what the Python reader holds
    assert json.dumps(json.loads(c["provenance_json"]), sort_keys=True) == json.dumps(py.provenance, sort_keys=True)
    assert [s["layer"] for s in c["sites"]] == py.layers
    for cs, site in zip(c["sites"], py.sites):
        assert cs["latent_dim"] == site.latent_dim
        assert cs["ops"] == " ".join(op.kind for op in site.ops) and cs["n_ops"] == len(site.ops)
        assert cs["has_gate"] == (site.gate is not None)
        assert cs["has_edit_scale"] == (site.edit_scale is not None)
        assert cs["delta_norm"] == pytest.approx(float(np.linalg.norm(site.delta.astype(np.float64))), rel=1e-5)


def test_tiny_linear_flow(flow_info, tmp_path):
    with_provenance = tmp_path / "tiny.gguf"
    tiny_flow(behavior="höflich ✓", provenance={"pairs": 3, "note": 'quote " and \\'}).save(with_provenance)
    without = tmp_path / "bare.gguf"
    tiny_flow(provenance={}).save(without)
    c, bare = info(flow_info, with_provenance, without)
    assert c["status"] == "ok"
    assert (c["name"], c["behavior"], c["method"]) == ("tiny", "höflich ✓", "mean-diff")
    assert (c["model_name"], c["model_architecture"], c["model_n_embd"], c["model_n_layer"]) == ("tiny-model", "llama", 8, 4)
    assert (c["n_sites"], c["default_strength"]) == (1, 2.5)
    assert json.loads(c["provenance_json"]) == {"pairs": 3, "note": 'quote " and \\'}
    (site,) = c["sites"]
    assert site == {"layer": 2, "latent_dim": 8, "n_ops": 0, "ops": "", "has_gate": False, "has_edit_scale": False,
                    "delta_norm": pytest.approx(float(np.linalg.norm(np.arange(1, 9))), rel=1e-6)}
    assert bare["status"] == "ok" and bare["provenance_json"] == ""


def test_absent_strings_read_empty(flow_info, tmp_path):
    src = tmp_path / "tiny.gguf"
    tiny_flow(provenance={"a": 1}).save(src)
    (c,) = info(flow_info, rewrite(src, tmp_path / "bare.gguf", drop=STRING_KEYS))
    assert c["status"] == "ok"
    assert all(c[k] == "" for k in ("name", "behavior", "method", "model_name", "model_architecture", "provenance_json"))


# a placeholder per key, written by the Python writer and then corrupted in place
PLACEHOLDERS = {
    "general.name": dict(name="NAME-PLACEHOLDER"),
    "innsteer.behavior": dict(behavior="BEHAVIOR-PLACEHOLDER"),
    "innsteer.method": dict(method="METHOD-PLACEHOLDER"),
    "innsteer.provenance": dict(provenance={"note": "PROVENANCE-PLACEHOLDER"}),
}


@pytest.mark.parametrize("key", sorted(PLACEHOLDERS))
@pytest.mark.parametrize("bad", [b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80"], ids=["invalid-byte", "overlong", "surrogate"])
def test_non_utf8_string_refused(flow_info, tmp_path, key, bad):
    path = tmp_path / "flow.gguf"
    tiny_flow(**PLACEHOLDERS[key]).save(path)
    placeholder = next(iter(PLACEHOLDERS[key].values()))
    placeholder = (placeholder if isinstance(placeholder, str) else placeholder["note"]).encode()
    patch(path, placeholder, bad + placeholder[len(bad):])
    (c,) = info(flow_info, path)
    assert c["status"] == "invalid flow"
    assert c["error"] == f"{key} is not valid UTF-8"


def test_model_strings_non_utf8_refused(flow_info, tmp_path):
    path = tmp_path / "flow.gguf"
    Flow.linear({1: np.ones(8, np.float32)}, ModelInfo("MODEL-PLACEHOLDER", "ARCH-PLACEHOLDER", 8, 4)).save(path)
    arch = tmp_path / "arch.gguf"
    arch.write_bytes(path.read_bytes())
    patch(path, b"MODEL-PLACEHOLDER", b"\xffODEL-PLACEHOLDER")
    patch(arch, b"ARCH-PLACEHOLDER", b"\xffRCH-PLACEHOLDER")
    model, architecture = info(flow_info, path, arch)
    assert model["error"] == "innsteer.model.name is not valid UTF-8"
    assert architecture["error"] == "innsteer.model.architecture is not valid UTF-8"


@pytest.mark.parametrize("key", STRING_KEYS)
def test_string_key_of_another_type_refused_like_python(flow_info, tmp_path, key):
    src = tmp_path / "tiny.gguf"
    tiny_flow(provenance={"a": 1}).save(src)
    bad = rewrite(src, tmp_path / "bad.gguf", set_kv={key: (U32, 7)})
    (c,) = info(flow_info, bad)
    assert c["status"] == "invalid flow"
    assert c["error"] == f"{key} must be a string, found GGUF type {U32}"
    with pytest.raises(FlowFormatError, match=key):
        read_flow(bad)


def test_string_length_cap(flow_info, tmp_path, monkeypatch):
    import innsteer_local.flow.format as fmt

    at_cap, over = tmp_path / "at.gguf", tmp_path / "over.gguf"
    tiny_flow(behavior="b" * MAX_META_STRING).save(at_cap)
    long_name = "ü" * (MAX_META_STRING // 2) + "b"
    with pytest.raises(ValueError, match="bytes long"):
        tiny_flow(behavior=long_name).save(over)  # the writer never makes such a file
    monkeypatch.setattr(fmt, "MAX_META_STRING", 1 << 20)  # a hostile writer does
    tiny_flow(behavior=long_name).save(over)
    monkeypatch.undo()
    ok, refused = info(flow_info, at_cap, over)
    assert ok["status"] == "ok" and ok["behavior"] == "b" * MAX_META_STRING
    assert refused["status"] == "invalid flow"
    message = f"innsteer.behavior is {MAX_META_STRING + 1} bytes long, cap is {MAX_META_STRING}"
    assert refused["error"] == message
    with pytest.raises(FlowFormatError, match=message):
        Flow.load(over)
