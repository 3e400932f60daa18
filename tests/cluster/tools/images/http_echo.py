"""The `lambdalet.test/http-echo` test image: a small HTTP server (standard library only) that tells tests
who it is and what it sees. Binds $LAMBDALET_BIND_ADDRESS (default 0.0.0.0), port $PORT (default 8080).

    GET  /               {"pod": <hostname>, "address": <bind address>, "pid": ..., "cwd": ...}
    GET  /ready          200 while ready, 503 while not (initially $ECHO_READY, default "true")
    POST /ready?ok=0|1   flips readiness
    GET  /healthz        200 while live, 500 after POST /healthz?ok=0
    GET  /env?name=N     the value of environment variable N (404 if unset)
    GET  /file?path=P    the content of file P (404 if missing)
    GET  /fetch?url=U    fetches U from inside the pod: {"status": ..., "body": ...} (502 if unreachable)
    GET  /whoami         asks the API server who the pod's ServiceAccount token belongs to (a
                         SelfSubjectReview with the mounted token), returns {"username": ..., "groups": ...}

On a real cluster build it from tests/cluster/tools/images/http-echo.Dockerfile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class State:
    ready = os.environ.get("ECHO_READY", "true").lower() == "true"
    live = True


def whoami() -> tuple[int, dict[str, object]]:
    token = (SERVICE_ACCOUNT / "token").read_text().strip()
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ["KUBERNETES_SERVICE_PORT"]
    context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
    request = urllib.request.Request(
        f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            review = json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {"error": error.read().decode(errors="replace")}
    info = review["status"]["userInfo"]
    namespace = (SERVICE_ACCOUNT / "namespace").read_text().strip()
    return 200, {"username": info["username"], "groups": info.get("groups", []), "namespace": namespace}


def fetch(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return 200, {"status": response.status, "body": response.read().decode(errors="replace")}
    except urllib.error.HTTPError as error:
        return 200, {"status": error.code, "body": error.read().decode(errors="replace")}
    except (OSError, ValueError) as error:
        return 502, {"error": f"{type(error).__name__}: {error}"}


class Handler(BaseHTTPRequestHandler):
    server_version = "http-echo"

    def _send(self, status: int, payload: object) -> None:
        if isinstance(payload, bytes):
            body, content_type = payload, "application/octet-stream"
        else:
            body, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/":
            address = os.environ.get("LAMBDALET_BIND_ADDRESS", "0.0.0.0")
            self._send(200, {"pod": socket.gethostname(), "address": address, "pid": os.getpid(), "cwd": os.getcwd()})
        elif url.path == "/ready":
            self._send(200 if State.ready else 503, {"ready": State.ready})
        elif url.path == "/healthz":
            self._send(200 if State.live else 500, {"live": State.live})
        elif url.path == "/env":
            value = os.environ.get(query.get("name", ""))
            self._send(404 if value is None else 200, {"value": value})
        elif url.path == "/file":
            try:
                self._send(200, Path(query.get("path", "")).read_bytes())
            except OSError as error:
                self._send(404, {"error": str(error)})
        elif url.path == "/fetch":
            self._send(*fetch(query.get("url", "")))
        elif url.path == "/whoami":
            try:
                self._send(*whoami())
            except (OSError, KeyError, ValueError) as error:
                self._send(500, {"error": f"{type(error).__name__}: {error}"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        ok = parse_qs(url.query).get("ok", ["1"])[-1] == "1"
        if url.path == "/ready":
            State.ready = ok
            self._send(200, {"ready": State.ready})
        elif url.path == "/healthz":
            State.live = ok
            self._send(200, {"live": State.live})
        else:
            self._send(404, {"error": "not found"})

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} {format % args}\n")
        sys.stdout.flush()


def main() -> None:
    host = os.environ.get("LAMBDALET_BIND_ADDRESS", "0.0.0.0")
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"http-echo listening on {host}:{port} as {socket.gethostname()}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
