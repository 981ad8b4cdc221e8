"""A local stand-in for the Hugging Face Hub's file routes, for the real `huggingface_hub` client.

It serves model repos from local directories (HEAD and GET on
`/{repo}/resolve/{revision}/{path}`) and records every request, so tests can check
which files a node fetched. The real Hub cannot be reached from CI; this server is
the only mock, and the client code under test is the real one.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import urllib.parse


class FakeHub:
    """Serve `repos` (repo id -> directory) on 127.0.0.1 at a free port."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repos: dict[str, str]):
        self.repos = dict(repos)
        self.requests: list[tuple[str, str]] = []  # (method, path)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, repo: str) -> list[str]:
        """Files of `repo` that were fetched with GET (in order)."""
        prefix = f"/{repo}/resolve/"
        return [p[len(prefix):].split("/", 1)[1] for m, p in self.requests if m == "GET" and p.startswith(prefix)]

    def _serve(self, handler, *, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        for repo, root in self.repos.items():
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                _revision, _, filename = path[len(prefix):].partition("/")
                full = os.path.join(root, filename)
                if ".." in filename or not os.path.isfile(full):
                    return self._error(handler, 404, "EntryNotFound", f"{filename} not in {repo}")
                with open(full, "rb") as f:
                    data = f.read()
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(data)))
                handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                handler.send_header("X-Repo-Commit", self.COMMIT)
                handler.send_header("Content-Type", "application/octet-stream")
                handler.end_headers()
                if body:
                    handler.wfile.write(data)
                return
        self._error(handler, 404, "RepoNotFound", f"no repo for {path}")

    @staticmethod
    def _error(handler, status: int, code: str, message: str) -> None:
        payload = ('{"error": "%s"}' % message).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(payload)
