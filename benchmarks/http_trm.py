"""The reference's architecture for comparison: the TRM behind an HTTP server in its own process.

``start_server`` launches ``python -m benchmarks.http_trm <config-json>`` bound to 127.0.0.1 on an
ephemeral port; :class:`HTTPRetriever` has the in-process retriever's ``retrieve`` signature and
sends each batch as one JSON POST over a persistent loopback connection. Used by
``benchmarks.env_speed`` to run the same episodes both ways. Loopback only; the server is stopped by
the caller and exits on its own after ``--idle`` seconds without a request.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def _resources(config: dict):
    from deeprec_env.env import EnvConfig, get_resources
    from deeprec_env.trm import TRMConfig

    cfg = dict(config)
    if "trm" in cfg:
        cfg["trm"] = TRMConfig(**cfg["trm"])
    return get_resources(EnvConfig(**cfg), progress=False)


def serve(config: dict, idle_s: float = 600.0) -> None:
    """Serve POST /retrieve on 127.0.0.1; prints the port on stdout, then blocks."""
    retriever = _resources(config).retriever
    last = [time.monotonic()]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms delayed-ACK stalls between header and body

        def do_POST(self):  # noqa: N802 (http.server's naming)
            last[0] = time.monotonic()
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            hist = [np.asarray(h, dtype=np.int64) for h in body["histories"]]
            exclude = body.get("exclude")
            ids, scores = retriever.retrieve(hist, body["preferences"], int(body["k"]), exclude=exclude)
            data = json.dumps({"ids": ids.tolist(), "scores": np.nan_to_num(scores, neginf=-1e30).tolist()})
            payload = data.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)

    def watchdog():
        while time.monotonic() - last[0] < idle_s:
            time.sleep(1.0)
        server.shutdown()

    threading.Thread(target=watchdog, daemon=True).start()
    server.serve_forever()


class HTTPRetriever:
    """Client with the signature of :meth:`deeprec_env.retrieval.Retriever.retrieve`."""

    def __init__(self, port: int, max_len: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.max_len = max_len

    def retrieve(self, histories, preferences=None, k: int = 20, *, exclude=None, exclude_history=False):
        """POST the batch and return ``(ids, scores)`` arrays."""
        if exclude_history:
            raise NotImplementedError("exclude_history is not sent over HTTP in this benchmark")
        body = {
            "histories": [np.asarray(h).tolist() for h in histories],
            "preferences": list(preferences) if preferences is not None else None,
            "k": k,
            "exclude": [np.asarray(e).tolist() for e in exclude] if exclude is not None else None,
        }
        payload = json.dumps(body).encode()
        self.conn.request("POST", "/retrieve", body=payload, headers={"Content-Type": "application/json"})
        data = json.loads(self.conn.getresponse().read())
        return np.asarray(data["ids"], dtype=np.int64), np.asarray(data["scores"], dtype=np.float32)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def start_server(config: dict, timeout_s: float = 300.0) -> tuple[subprocess.Popen, int]:
    """Launch the server process with ``config`` (EnvConfig fields as JSON) and wait for its port."""
    cfg = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in config.items()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.http_trm", json.dumps(cfg)], stdout=subprocess.PIPE, text=True
    )
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    line = got[0] if got else ""
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the TRM server did not start within {timeout_s:.0f} s (first line {line!r})")
    return proc, int(line)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
