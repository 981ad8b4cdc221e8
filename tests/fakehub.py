"""A local stand-in for the Hugging Face Hub's routes, for the real `huggingface_hub` client.

It serves model repos from local directories (HEAD and GET on
`/{repo}/resolve/{revision}/{path}`, with HTTP range requests: 206 and the slice, recorded), and dataset repos held in memory that take
commits the way the Hub does: `POST /api/repos/create`, `GET /api/datasets/{repo}/revision/{rev}`,
`POST .../preupload/{rev}` (every file "regular"), `POST .../commit/{rev}` (NDJSON,
base64 content, deletions, `parentCommit` checked: 412 if the branch moved), and the
download routes under `/datasets/{repo}/resolve/...`. It records every request, and
`fail_commits` makes the next commits fail with a given status, to test retries.
The real Hub cannot be reached from CI; this server is the only mock, and the client
code under test is the real one.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import threading
import urllib.parse


class FakeHub:
    """Serve `repos` (repo id -> directory) on 127.0.0.1 at a free port."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repos: dict[str, str] | None = None):
        self.repos = dict(repos or {})
        self.datasets: dict[str, list[tuple[str, dict[str, bytes]]]] = {}  # repo -> commits (oid, files), oldest first
        self.fail_commits: list[int] = []  # statuses the next commits fail with, in order
        self.commit_bytes: list[int] = []  # payload size of each accepted commit
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.ranges: list[tuple[str, str, int, int]] = []  # (repo, file, start, end) of each range request served
        self.lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                hub._post(self, self.rfile.read(length))

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

    # -- dataset repos ----------------------------------------------------------

    def files(self, repo: str) -> dict[str, bytes]:
        """The files at the head of dataset `repo`."""
        with self.lock:
            return dict(self.datasets[repo][-1][1])

    def commit(self, repo: str, changes: dict[str, bytes | None]) -> str:
        """Commit `changes` (None deletes) to dataset `repo` directly, as another writer would."""
        with self.lock:
            return self._commit(repo, changes)

    def _commit(self, repo: str, changes: dict[str, bytes | None]) -> str:
        files = dict(self.datasets[repo][-1][1])
        for path, data in changes.items():
            if data is None:
                files.pop(path, None)
            else:
                files[path] = data
        oid = hashlib.sha1(os.urandom(20)).hexdigest()  # unique, as a real commit's is
        self.datasets[repo].append((oid, files))
        return oid

    def _head(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        for oid, files in reversed(self.datasets.get(repo, [])):
            if revision in ("main", oid):
                return oid, files
        return None

    def _post(self, handler, raw: bytes) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(handler.path).path)
        self.requests.append(("POST", path))
        with self.lock:
            if path == "/api/repos/create":
                spec = json.loads(raw)
                repo = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
                if repo in self.datasets:
                    return self._json(handler, 409, {"error": "You already created this dataset repo",
                                                     "url": f"{self.endpoint}/datasets/{repo}"})
                self.datasets[repo] = [(hashlib.sha1(os.urandom(20)).hexdigest(), {})]
                return self._json(handler, 200, {"url": f"{self.endpoint}/datasets/{repo}"})
            parts = path.split("/")  # ['', 'api', 'datasets', user, name, route, revision]
            if len(parts) != 7 or parts[:3] != ["", "api", "datasets"]:
                return self._error(handler, 404, "RepoNotFound", f"no route {path}")
            repo, route, revision = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
            if repo not in self.datasets:
                return self._error(handler, 404, "RepoNotFound", f"{repo} not found")
            if revision != "main":  # distllm commits to the main branch only
                return self._error(handler, 404, "RevisionNotFound", f"no branch {revision}")
            if route == "preupload":
                files = json.loads(raw)["files"]
                return self._json(handler, 200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if route != "commit":
                return self._error(handler, 404, "RepoNotFound", f"no route {path}")
            if self.fail_commits:
                status = self.fail_commits.pop(0)
                return self._error(handler, status, "Error", f"commit refused ({status}), try again later")
            lines = [json.loads(line) for line in raw.split(b"\n") if line.strip()]
            header = lines[0]["value"]
            head = self.datasets[repo][-1][0]
            if header.get("parentCommit") not in (None, head):
                return self._error(handler, 412, "Error", "A commit has happened since. Please refresh and try again.")
            changes: dict[str, bytes | None] = {}
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    changes[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    changes[value["path"]] = None
            oid = self._commit(repo, changes)
            self.commit_bytes.append(len(raw))
            return self._json(handler, 200, {"commitUrl": f"{self.endpoint}/datasets/{repo}/commit/{oid}",
                                             "commitOid": oid})

    def _json(self, handler, status: int, value) -> None:
        payload = json.dumps(value).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _serve_dataset(self, handler, path: str, *, body: bool) -> None:
        if path.startswith("/api/datasets/"):  # repo info: /api/datasets/{user}/{name}/revision/{rev}
            parts = path.split("/")
            repo, revision = f"{parts[3]}/{parts[4]}", parts[6] if len(parts) > 6 else "main"
            with self.lock:
                found = self._head(repo, revision)
            if found is None:
                return self._error(handler, 404, "RepoNotFound", f"{repo}@{revision} not found")
            oid, files = found
            return self._json(handler, 200, {"id": repo, "sha": oid, "private": True,
                                             "siblings": [{"rfilename": name} for name in sorted(files)]})
        rest = path[len("/datasets/"):]  # {user}/{name}/resolve/{rev}/{file}
        user, name, _resolve, revision, filename = (rest.split("/", 4) + [""] * 5)[:5]
        with self.lock:
            found = self._head(f"{user}/{name}", revision)
        if found is None:
            return self._error(handler, 404, "RevisionNotFound", f"{user}/{name}@{revision} not found")
        oid, files = found
        if filename not in files:
            return self._error(handler, 404, "EntryNotFound", f"{filename} not in {user}/{name}")
        data = files[filename]
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("X-Repo-Commit", oid)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    # -- model repos ------------------------------------------------------------

    def _serve(self, handler, *, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        if path.startswith(("/api/datasets/", "/datasets/")):
            return self._serve_dataset(handler, path, body=body)
        for repo, root in self.repos.items():
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                _revision, _, filename = path[len(prefix):].partition("/")
                full = os.path.join(root, filename)
                if ".." in filename or not os.path.isfile(full):
                    return self._error(handler, 404, "EntryNotFound", f"{filename} not in {repo}")
                with open(full, "rb") as f:
                    data = f.read()
                etag = hashlib.sha256(data).hexdigest()
                ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", handler.headers.get("Range") or "")
                if ranged and body:  # an HTTP range request (a GGUF read tensor by tensor): 206 with the slice
                    start, end = int(ranged[1]), min(int(ranged[2]) + 1, len(data))
                    with self.lock:
                        self.ranges.append((repo, filename, start, end))
                    handler.send_response(206)
                    handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                    data = data[start:end]
                else:
                    handler.send_response(200)
                handler.send_header("Content-Length", str(len(data)))
                handler.send_header("ETag", f'"{etag}"')
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
