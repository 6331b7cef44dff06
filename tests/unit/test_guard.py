"""The server's access rules on their own (apps/server/guard.py; the real server: test_server_security.py)."""

from __future__ import annotations

import pytest

from innsteer_local.apps.server.guard import Policy


@pytest.mark.parametrize("bound, header, ok", [
    ("127.0.0.1", "127.0.0.1:8080", True),
    ("127.0.0.1", "localhost:8080", True),
    ("127.0.0.1", "LOCALHOST", True),
    ("127.0.0.1", "evil.example", False),
    ("127.0.0.1", "evil.example:8080", False),
    ("127.0.0.1", "127.0.0.1.evil.example", False),
    ("127.0.0.1", "", False),
    ("127.0.0.1", "192.168.1.5:8080", False),  # an IP the server is not bound to
    ("0.0.0.0", "192.168.1.5:8080", True),  # a wildcard bind: IP literals cannot be rebound
    ("0.0.0.0", "[fe80::1]:8080", True),
    ("0.0.0.0", "myhost.lan:8080", False),
    ("::1", "[::1]:8080", True),
])
def test_host_header(bound, header, ok):
    assert Policy(host=bound).host_allowed(header) is ok


def test_allowed_hosts_and_origins():
    p = Policy(allowed_hosts=("MyHost.lan",), cors=("http://localhost:3000",))
    assert p.host_allowed("myhost.lan:8080")
    assert p.origin_allowed("http://localhost:3000", "127.0.0.1:8080")
    assert p.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080")  # the server's own page
    assert not p.origin_allowed("http://127.0.0.1:9999", "127.0.0.1:8080")
    assert not p.origin_allowed("null", "127.0.0.1:8080")


def test_key():
    assert Policy().key_ok(None)
    p = Policy(api_key="s3cret-key")
    assert p.key_ok("Bearer s3cret-key") and p.key_ok("bearer  s3cret-key")
    for bad in (None, "", "Bearer", "Bearer s3cret-kez", "Basic s3cret-key", "Bearer s3cret-key2", "s3cret-key"):
        assert not p.key_ok(bad), bad


def test_json_depth():
    from innsteer_local.apps.server import json_depth

    assert json_depth(b'{"a": [1, {"b": "[[[["}]}') == 3  # brackets inside strings do not count
    assert json_depth(b'{"a": "\\"[[", "b": [[]]}') == 3
    assert json_depth(b"[" * 50 + b"]" * 50) == 50
    assert json_depth(b"") == 0
