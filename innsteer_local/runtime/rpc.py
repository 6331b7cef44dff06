"""A model split across machines with llama.cpp's RPC backend (docs/EMBEDDING.md, "Across machines").

Each host runs `rpc-server` (scripts/build_rpc_server.sh builds it from the same llama.cpp);
`add_servers(["10.0.0.2:50052", ...])` connects to them and returns their ggml devices, and a model
loaded with those devices (llama_model_params.devices) and its layers offloaded is split across
them by their free memory, as with llama.cpp's own `--rpc`. Steering needs nothing more: llama.cpp calls the eval callback for tensors on
any backend and forwards the callback's reads and writes to the server that holds them.

Needs llama-cpp-python built with the RPC backend:
`python innsteer_local/runtime/llama_build.py install --rpc --python .venv/bin/python`.
rpc-server has no authentication: keep it on loopback or a trusted network.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import InnsteerError

_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_lock = threading.Lock()
_registered: dict[str, list["Device"]] = {}  # endpoint -> its devices


@dataclass(frozen=True)
class Device:
    name: str
    description: str  # the endpoint
    free_mib: int
    total_mib: int
    ptr: int = 0  # ggml_backend_dev_t


def parse_endpoints(value: str | Sequence[str]) -> list[str]:
    """'HOST:PORT[,HOST:PORT]' (or a list) -> endpoints, checked."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in (i.strip() for i in items):
        m = _ENDPOINT.match(item)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise InnsteerError(f"RPC server '{item}' is not HOST:PORT (e.g. 127.0.0.1:50052)")
        out.append(item)
    if not out:
        raise InnsteerError("no RPC servers given: --rpc HOST:PORT[,HOST:PORT]")
    return out


def _loaded_ggml() -> str:
    """The path of the libggml that llama_cpp's libllama is linked to, as mapped in this process: a
    wheel holds libggml.so, .so.0 and .so.0.x as separate copies, and a device made by a copy that
    libllama does not use is not one llama.cpp can place layers on."""
    import llama_cpp  # noqa: F401  (maps libllama and its libggml)

    try:
        mapped = [line.split(None, 5)[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                  if line.count(" ") >= 5]
    except OSError:
        mapped = []
    # libllama names its dependency by soname (libggml.so.0); other copies may be mapped too
    for pattern in (r"/libggml\.so\.\d+$", r"/libggml\.(so[.0-9]*|dylib)$"):
        found = [p for p in mapped if re.search(pattern, p)]
        if found:
            return found[0]
    return "libggml.so.0"  # already loaded under its soname: dlopen returns that instance


def _ggml() -> ctypes.CDLL:
    try:
        g = ctypes.CDLL(_loaded_ggml())
    except OSError as e:
        raise InnsteerError(f"llama.cpp's ggml library not found: {e}") from None
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for fn, res, args in (("ggml_backend_reg_by_name", vp, [cp]), ("ggml_backend_reg_get_proc_address", vp, [vp, cp]),
                          ("ggml_backend_dev_count", ctypes.c_size_t, []),
                          ("ggml_backend_dev_get", vp, [ctypes.c_size_t]), ("ggml_backend_dev_name", cp, [vp]),
                          ("ggml_backend_dev_description", cp, [vp]),
                          ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(ctypes.c_size_t),
                                                             ctypes.POINTER(ctypes.c_size_t)]),
                          ("ggml_backend_reg_dev_count", ctypes.c_size_t, [vp]),
                          ("ggml_backend_dev_by_type", vp, [ctypes.c_int]),
                          ("ggml_backend_reg_dev_get", vp, [vp, ctypes.c_size_t])):
        f = getattr(g, fn)
        f.restype, f.argtypes = res, args
    return g


GGML_DEVICE_GPU, GGML_DEVICE_IGPU = 1, 2  # enum ggml_backend_dev_type


def local_gpu() -> bool:
    """Whether ggml has a GPU device in this process. llama_supports_gpu_offload() also says yes
    for any build with the RPC backend (quickstart.sh's), GPU or not."""
    try:
        g = _ggml()
    except (InnsteerError, OSError):
        return False
    return bool(g.ggml_backend_dev_by_type(GGML_DEVICE_GPU) or g.ggml_backend_dev_by_type(GGML_DEVICE_IGPU))


def supported() -> bool:
    """Whether this llama.cpp build has the RPC backend."""
    try:
        return bool(_ggml().ggml_backend_reg_by_name(b"RPC"))
    except (InnsteerError, OSError):
        return False


def add_servers(endpoints: Sequence[str]) -> list[Device]:
    """Connects to each rpc-server (once per process) and returns its devices, in order. They are
    not added to ggml's global registry: a model gets them explicitly (model_devices), so a model
    loaded later without --rpc never touches them (nor a server that has gone away since).
    Raises InnsteerError when the build has no RPC backend or a server does not answer."""
    g = _ggml()
    reg = g.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise InnsteerError("this llama.cpp was built without the RPC backend: python innsteer_local/runtime/"
                            "llama_build.py install --rpc --python $(which python)")
    add = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not add:
        raise InnsteerError("this llama.cpp's RPC backend has no ggml_backend_rpc_add_server")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)
    out: list[Device] = []
    with _lock:
        for ep in parse_endpoints(endpoints):
            if ep not in _registered:
                _reachable(ep)  # ggml aborts the whole process when it cannot connect
                server = add_server(ep.encode())
                n = g.ggml_backend_reg_dev_count(server) if server else 0
                if not n:
                    raise InnsteerError(f"RPC server {ep} did not answer (is rpc-server running there? "
                                        "scripts/build_rpc_server.sh builds it)")
                _registered[ep] = [_device(g, g.ggml_backend_reg_dev_get(server, i)) for i in range(n)]
            out += _registered[ep]
    return out


def model_devices(devices: Sequence[Device]) -> Any:
    """A NULL-terminated array for llama_model_params.devices (keep it alive while the model loads)."""
    return (ctypes.c_void_p * (len(devices) + 1))(*[d.ptr for d in devices], None)


_params_lock = threading.Lock()


@contextlib.contextmanager
def loading_onto(devices: Sequence[Device]) -> Iterator[None]:
    """Models that llama_cpp.Llama loads in this block get these devices: Llama.__init__ fills
    llama_model_params itself and loads at once, so while it runs the default parameters it starts
    from carry them (add n_gpu_layers=-1 to offload every layer)."""
    from llama_cpp import llama as llama_module

    array = model_devices(devices)
    with _params_lock:
        default = llama_module.llama_cpp.llama_model_default_params

        def with_devices() -> Any:
            params = default()
            params.devices = ctypes.cast(array, ctypes.c_void_p)
            return params

        llama_module.llama_cpp.llama_model_default_params = with_devices
        try:
            yield
        finally:
            llama_module.llama_cpp.llama_model_default_params = default


def _device(g: ctypes.CDLL, ptr: int) -> Device:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    g.ggml_backend_dev_memory(ptr, ctypes.byref(free), ctypes.byref(total))
    return Device(g.ggml_backend_dev_name(ptr).decode(), g.ggml_backend_dev_description(ptr).decode(),
                  free.value >> 20, total.value >> 20, ptr)


def _reachable(endpoint: str, timeout: float = 3.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise InnsteerError(f"RPC server {endpoint} does not answer ({e.strerror or e}); start it there with "
                            f"`rpc-server -H HOST -p {port}` (scripts/build_rpc_server.sh builds it)") from None
