"""Loopback-only helpers: port ownership from /proc, control API client."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request


def _listeners(port: int) -> list[int]:
    inodes = []
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state != "0A":
                        continue
                    if int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.append(int(inode))
        except OSError:
            pass
    return inodes


def port_owner(port: int) -> str | None:
    """Describe the process listening on `port`, if it can be found."""
    inodes = {f"socket:[{i}]" for i in _listeners(port)}
    if not inodes:
        return None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid} ({cmd[:160]})"
            except OSError:
                continue
    return "a process this user cannot see"


def port_in_use(host: str, port: int) -> str | None:
    """None if host:port can be bound, else a clear message naming the port and owner."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return None
    except OSError as e:
        owner = port_owner(port)
        who = f"by {owner}" if owner else f"({e.strerror})"
        return f"port {port} on {host} is already in use {who}; pick another with --port or WORLD_PORT"
    finally:
        s.close()


def control(port: int, method: str, path: str, body=None, timeout: float = 30.0):
    """Call the world's control API on 127.0.0.1:port. Returns (status, json)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, {"error": str(e)}
