"""Loopback Hugging Face Hub for tests: olah (offline mode) serves downloads, a small endpoint takes uploads.

* :class:`OlahServer` runs the real ``olah`` server in a subprocess, in offline mode, serving the bare git
  repos under ``<root>/mirrors/models/ORG/NAME`` to the stock ``huggingface_hub`` client.
* :class:`UploadServer` implements the routes ``HfApi.create_repo``, ``create_branch``, ``upload_folder``
  (``validate-yaml``, ``preupload``, ``commit`` with an ndjson payload of base64 regular files) use, and
  commits into those same git repos with git plumbing, so what is pushed is what olah serves. With
  ``lfs_threshold`` set (off by default), files from that many bytes up go the Hub's LFS way (the client
  must not use Xet: ``HF_HUB_DISABLE_XET``): ``preupload`` says ``lfs``, the client asks the LFS batch
  endpoint, PUTs the bytes (checked against their sha256 and size) and commits an ``lfsFile`` line; the
  object's bytes are then committed as the git blob itself, since olah serves the blobs of its mirrors.

Both bind 127.0.0.1 only. Nothing here reaches any other address.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from support.processes import free_port

LOOPBACK = "127.0.0.1"
_GIT_ENV = {"GIT_AUTHOR_NAME": "hubserver", "GIT_AUTHOR_EMAIL": "hubserver@localhost",
            "GIT_COMMITTER_NAME": "hubserver", "GIT_COMMITTER_EMAIL": "hubserver@localhost",
            "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def refuse_non_loopback(monkeypatch) -> None:
    """Refuse, for one test, any connection from this process that is not to a loopback address."""
    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to reach {address!r}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout}s")


def git(repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
    result = subprocess.run(["git", "--git-dir", str(repo), *args], input=input, capture_output=True,
                            env={**os.environ, **_GIT_ENV, **(env or {})}, check=True)
    return result.stdout.decode().strip()


# ----------------------------------------------------------------------------------------------- olah
class OlahServer:
    """The real olah mirror server, offline, serving ``mirrors_path`` on a free loopback port."""

    def __init__(self, root: Path, mirrors: Path | None = None):
        self.root = Path(root)
        self.mirrors = Path(mirrors) if mirrors is not None else self.root / "mirrors"
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> OlahServer:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "{LOOPBACK}"\nport = {self.port}\n'
            f'repos-path = "{self.root / "repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            f'mirror-netloc = "{LOOPBACK}:{self.port}"\nmirror-lfs-netloc = "{LOOPBACK}:{self.port}"\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n")
        self.log = open(self.root / "olah.out", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "olah.server", "--config", str(config),
                                      "--log-path", str(self.root / "logs")], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.root)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


# --------------------------------------------------------------------------------------------- uploads
class _Handler(BaseHTTPRequestHandler):
    server: _UploadHTTPServer

    def log_message(self, format, *args):  # quiet
        return

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        self._send(404, {"error": f"upload endpoint has no GET {self.path}"})

    def do_PUT(self):
        owner = self.server.owner
        path = self.path.split("?")[0]
        owner.requests.append(("PUT", path, self.headers.get("Authorization")))
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if not m:
            return self._send(404, {"error": f"no route PUT {path}"})
        return self._send(*owner.lfs_put(m.group(1), self._body()))

    def do_POST(self):
        owner = self.server.owner
        owner.requests.append(("POST", self.path.split("?")[0], self.headers.get("Authorization")))
        path = self.path.split("?")[0]
        body = self._body()
        try:
            if path == "/api/repos/create":
                return self._send(*owner.create_repo(json.loads(body)))
            if path == "/api/validate-yaml":
                return self._send(*owner.validate_yaml(json.loads(body)))
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m:
                return self._send(*owner.lfs_batch(m.group(1), json.loads(body)))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
            if m:
                repo_id, route, rev = m.group(1), m.group(2), m.group(3).replace("%2F", "/")
                if route == "preupload":
                    return self._send(*owner.preupload(repo_id, json.loads(body)))
                if route == "branch":
                    return self._send(*owner.create_branch(repo_id, rev, json.loads(body or b"{}")))
                return self._send(*owner.commit(repo_id, rev, body))
        except (ValueError, KeyError) as exc:
            return self._send(400, {"error": f"bad request: {exc}"})
        self._send(404, {"error": f"no route POST {path}"})


class _UploadHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: UploadServer


class UploadServer:
    """A minimal Hub write API committing into the bare repos under ``mirrors/models/ORG/NAME``."""

    def __init__(self, mirrors: Path, lfs_threshold: int | None = None):
        self.mirrors = Path(mirrors)
        self.lfs_threshold = lfs_threshold
        self.lfs_objects: dict[str, bytes] = {}
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._httpd: _UploadHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> UploadServer:
        self._httpd = _UploadHTTPServer((LOOPBACK, self.port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def repo_dir(self, repo_id: str) -> Path:
        org, name = repo_id.split("/")
        for part in (org, name):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", part) or ".." in part:
                raise ValueError(f"bad repo id {repo_id!r}")
        return self.mirrors / "models" / org / name

    # ---------------------------------------------------------------- routes
    def create_repo(self, payload: dict) -> tuple[int, dict]:
        repo_id = f"{payload['organization']}/{payload['name']}"
        repo = self.repo_dir(repo_id)
        with self._lock:
            if repo.exists():
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            repo.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(repo)], check=True,
                           env={**os.environ, **_GIT_ENV})
            # like the Hub, a new repo starts with one commit holding .gitattributes
            self._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         [], "initial commit")
        return 200, {"url": f"{self.url}/{repo_id}"}

    def validate_yaml(self, payload: dict) -> tuple[int, dict]:
        content = payload.get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if not m:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, repo_id: str, payload: dict) -> tuple[int, dict]:
        if not self.repo_dir(repo_id).exists():
            return 404, {"error": "Repository not found"}
        return 200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                "uploadMode": "lfs" if self.lfs_threshold is not None
                                and int(f.get("size", 0)) >= self.lfs_threshold else "regular"}
                               for f in payload["files"]]}

    def lfs_batch(self, repo_id: str, payload: dict) -> tuple[int, dict]:
        """The LFS batch API: where to PUT each object not stored yet (basic transfer)."""
        if not self.repo_dir(repo_id).exists():
            return 404, {"error": "Repository not found"}
        if payload.get("operation") != "upload":
            return 422, {"error": "only uploads"}
        objects = []
        for obj in payload["objects"]:
            oid, size = str(obj["oid"]), int(obj["size"])
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                raise ValueError(f"bad oid {oid!r}")
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{oid}", "header": {}}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, data: bytes) -> tuple[int, dict]:
        import hashlib

        if hashlib.sha256(data).hexdigest() != oid:
            return 400, {"error": "content does not match its oid"}
        with self._lock:
            self.lfs_objects[oid] = data
        return 200, {}

    def create_branch(self, repo_id: str, branch: str, payload: dict) -> tuple[int, dict]:
        repo = self.repo_dir(repo_id)
        with self._lock:
            if not repo.exists():
                return 404, {"error": "Repository not found"}
            if git(repo, "for-each-ref", f"refs/heads/{branch}"):
                return 409, {"error": f"Reference already exists: refs/heads/{branch}"}
            start = payload.get("startingPoint") or "main"
            git(repo, "update-ref", f"refs/heads/{branch}", git(repo, "rev-parse", f"{start}^{{commit}}"))
        return 200, {}

    def commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict]:
        repo = self.repo_dir(repo_id)
        if not repo.exists():
            return 404, {"error": "Repository not found"}
        header, files, deleted = None, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise ValueError("only base64 files")
                files[self._safe(value["path"])] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.lfs_objects.get(value.get("oid"))
                if data is None or len(data) != int(value.get("size", -1)):
                    return 422, {"error": f"LFS object {value.get('oid')} was not uploaded (or has another size)"}
                files[self._safe(value["path"])] = data
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(self._safe(value["path"]))
            else:
                return 422, {"error": f"unsupported commit operation {key!r} (keep files small: regular only)"}
        if header is None:
            raise ValueError("no header line")
        with self._lock:
            if not git(repo, "for-each-ref", f"refs/heads/{revision}"):
                return 404, {"error": f"Invalid rev id: {revision}"}
            oid = self._commit(repo, revision, files, deleted, header.get("summary") or "commit",
                               header.get("parentCommit"))
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}

    @staticmethod
    def _safe(path: str) -> str:
        parts = path.split("/")
        if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or ".git" in parts:
            raise ValueError(f"bad path {path!r}")
        return path

    def _commit(self, repo: Path, branch: str, files: dict[str, bytes], deleted: list[str], message: str,
                expected_parent: str | None = None) -> str:
        """Commit ``files`` on top of ``branch`` with plumbing only (bare repo, private index file)."""
        index = repo / f"index-{threading.get_ident()}"
        env = {"GIT_INDEX_FILE": str(index)}
        try:
            parent = git(repo, "for-each-ref", "--format=%(objectname)", f"refs/heads/{branch}")
            if expected_parent and expected_parent != parent:
                raise ValueError(f"parent commit {expected_parent} is not the head {parent}")
            if parent:
                git(repo, "read-tree", parent, env=env)
            else:
                git(repo, "read-tree", "--empty", env=env)
            for path, data in files.items():
                blob = git(repo, "hash-object", "-w", "--stdin", input=data)
                git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
            for path in deleted:
                git(repo, "update-index", "--force-remove", path, env=env)
            tree = git(repo, "write-tree", env=env)
            args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
            oid = git(repo, *args)
            git(repo, "update-ref", f"refs/heads/{branch}", oid, *([parent] if parent else []))
            return oid
        finally:
            index.unlink(missing_ok=True)


class LoopbackHub:
    """olah for downloads plus the upload endpoint, sharing one mirrors folder."""

    def __init__(self, root: Path):
        self.olah = OlahServer(root)
        self.upload = UploadServer(self.olah.mirrors)

    def start(self) -> LoopbackHub:
        self.olah.start()
        self.upload.start()
        return self

    def stop(self) -> None:
        self.upload.stop()
        self.olah.stop()

    def repo(self, repo_id: str) -> Path:
        return self.upload.repo_dir(repo_id)
