#!/usr/bin/env python3
"""bakery's sample web service.

GET /        -> the baked version
GET /healthz -> 200 "ok" when /opt/web/HEALTHZ says ok, else 503 (a deliberately bad build)

It binds BAKERY_WORLD_IP when the local world runs it (every instance there shares one network
stack and must bind its own loopback address), else WEB_BIND (default 0.0.0.0), port WEB_PORT
(default 8080).
"""
import http.server
import os

HOST = os.environ.get("BAKERY_WORLD_IP") or os.environ.get("WEB_BIND", "0.0.0.0")
PORT = int(os.environ.get("WEB_PORT", "8080"))


def read(name, default):
    try:
        with open(os.path.join("/opt/web", name)) as f:
            return f.read().strip()
    except OSError:
        return default


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            ok = read("HEALTHZ", "ok") == "ok"
            self.reply(200 if ok else 503, "ok\n" if ok else "unhealthy\n")
        else:
            self.reply(200, "web %s\n" % read("VERSION", "unknown"))

    def reply(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
