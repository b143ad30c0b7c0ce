"""Control API under /_world/ on the world's port (JSON in, JSON out)."""

from __future__ import annotations

import json
import re
import threading
from urllib.parse import parse_qs

from .frontdoor import SpecError

INSTANCE_RE = re.compile(r"^/_world/instances/(i-[0-9a-f]+)(?:/(kill|crash|reboot))?$")

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

_STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 500: "Internal Server Error"}


def _reply(start_response, status: int, obj):
    body = (json.dumps(obj, indent=1, default=str) + "\n").encode()
    start_response(
        f"{status} {_STATUS_TEXT.get(status, 'OK')}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


def handle_control(fd, environ, start_response):
    world = fd.world
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "").rstrip("/") or "/_world"
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    raw = environ["wsgi.input"].read(length) if length > 0 else b""

    def body_json():
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise SpecError(f"request body is not valid JSON: {e}")

    try:
        for m, prefix, fn in list(fd.control_routes):
            if m == method and path.startswith(prefix):
                res = fn(environ, raw)
                if res is None:  # not this route's path after all
                    continue
                status, obj = res
                return _reply(start_response, status, obj)

        if path in ("/_world", "/_world/status") and method == "GET":
            return _reply(start_response, 200, world.status())

        if path == "/_world/calls":
            if method != "GET":
                return _reply(start_response, 405, {"error": "use GET (or POST /_world/calls/reset)"})
            try:
                limit = int(qs.get("limit", ["1000"])[0])
            except ValueError:
                raise SpecError("limit must be an integer (the number of log entries to return)")
            access_key = qs.get("access_key", [None])[0]
            mut = qs.get("mutating", [None])[0]
            mutating = None
            if mut is not None:
                if mut.lower() not in _BOOLS:
                    raise SpecError("mutating must be true or false")
                mutating = _BOOLS[mut.lower()]
            since = None
            if qs.get("since"):
                try:
                    since = float(qs["since"][0])
                except ValueError:
                    raise SpecError("since must be a Unix time in seconds (the log entries' `t`)")
            srv = qs.get("served", [None])[0]
            served = None
            if srv is not None:
                if srv.lower() not in _BOOLS:
                    raise SpecError("served must be true or false")
                served = _BOOLS[srv.lower()]
            return _reply(start_response, 200,
                          fd.calls_report(limit, access_key or None, mutating, since, served))

        if path == "/_world/calls/reset" and method == "POST":
            fd.reset_calls()
            return _reply(start_response, 200, {"reset": True})

        if path == "/_world/faults":
            if method == "GET":
                return _reply(start_response, 200, fd.faults_spec())
            if method in ("POST", "PUT"):
                spec = body_json()
                if spec is None:
                    raise SpecError("empty fault spec: send a JSON object like {\"seed\":7,\"rules\":[...]}")
                return _reply(start_response, 200, fd.set_faults(spec))
            if method == "DELETE":
                return _reply(start_response, 200, fd.set_faults({"seed": fd.spec.get("seed", 0), "rules": []}))
            return _reply(start_response, 405, {"error": f"{method} not allowed on /_world/faults"})

        if path == "/_world/partitions" or path.startswith("/_world/partitions/"):
            # Cut callers off by access key id: every call they sign is dropped.
            key = path[len("/_world/partitions/"):] if path.startswith("/_world/partitions/") else None
            if method == "GET" and key is None:
                return _reply(start_response, 200, fd.partitions_report())
            if method in ("POST", "PUT"):
                body = body_json() or {}
                key = key or (body.get("access_key") if isinstance(body, dict) else None)
                return _reply(start_response, 200, fd.partition(key))
            if method == "DELETE":
                return _reply(start_response, 200, fd.heal(key))
            return _reply(start_response, 405, {"error": f"{method} not allowed on {path}"})

        m = INSTANCE_RE.match(path)
        if m:
            iid, verb = m.group(1), m.group(2)
            with world.lock:  # moto's models are read under the moto lock only
                inst = world.find_instance(iid)  # any account and region
                inst_state = inst.state if inst is not None else None
                inst_ip = inst.private_ip if inst is not None else None
            if inst is None:
                return _reply(start_response, 404, {"error": f"no instance {iid} in this world"})
            body = world.bodies.get(iid)
            if verb is None and method == "GET":
                return _reply(
                    start_response, 200,
                    {"instance_id": iid, "state": inst_state, "body": body.describe() if body else None},
                )
            if method != "POST":
                return _reply(start_response, 405, {"error": "use POST"})
            if body is None:
                return _reply(
                    start_response, 409,
                    {"error": f"instance {iid} has no live body (state {inst_state}; private IP {inst_ip})"},
                )
            if verb == "kill":
                body.kill_services()
            elif verb == "crash":
                body.crash()
            elif verb == "reboot":
                body.request_reboot()
            return _reply(start_response, 200, {"instance_id": iid, "done": verb, "body": body.describe()})

        if path == "/_world/shutdown" and method == "POST":
            cb = getattr(world, "request_shutdown", None)
            if cb is None:
                return _reply(start_response, 500, {"error": "shutdown not available"})
            threading.Thread(target=cb, daemon=True).start()
            return _reply(start_response, 200, {"shutting_down": True})

        return _reply(start_response, 404, {"error": f"unknown control path {method} {path}"})
    except SpecError as e:
        return _reply(start_response, 400, {"error": str(e)})
    except Exception as e:  # report, don't kill the server thread
        return _reply(start_response, 500, {"error": repr(e)})
