"""A local stand-in for the Hugging Face Hub, for tests only (a test double, not a product).

No Hub is reachable from the machines zoo is tested on, so this server speaks
the part of the Hub's HTTP API that ``huggingface_hub`` uses for zoo's calls:
repo creation and info (with file metadata: sizes, git blob ids, LFS sha256), file
trees, branches, preupload and commit, the Git LFS upload protocol for weight files
(preupload answers ``lfs`` for ``*.safetensors``, ``*.bin``, ``*.pt`` and files over
10 MB; the batch API hands out upload and verify URLs; the commit names the object by
its sha256, as the Hub does), YAML validation, ``whoami`` and file download with
``Range`` (resume) and the Hub's ETag headers. Point the real client at it with
``HF_ENDPOINT``. (With ``hf_xet`` installed, huggingface_hub uploads to the real Hub
through Xet instead; ``HF_HUB_DISABLE_XET=1`` makes it use LFS, which the Hub accepts too.)

    python -m zoo.testing.hub --root DIR --port P [--token WRITE] [--read-token READ]

Storage, under DIR: ``{models,datasets}/ORG/NAME/`` holds ``repo.json``
(privacy, branches), ``commits/SHA.json`` (each commit's file tree) and
``blobs/SHA256`` (file contents). Without tokens the server is open; with
them, writes need a write token (403 with a read token), private repos need a
token, and an unknown token gets 401 -- as on the Hub.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
LFS_MIN_SIZE = 10 * 1024 * 1024


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()
_REPO = r"(?P<type>model|dataset)s/(?P<repo>[^/]+/[^/]+)"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Store:
    """Repos on disk. One lock serializes writes (commits are rare in tests)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = threading.Lock()

    def repo_dir(self, kind: str, repo: str) -> Path:
        return self.root / f"{kind}s" / repo

    def meta(self, kind: str, repo: str) -> dict:
        path = self.repo_dir(kind, repo) / "repo.json"
        if not path.exists():
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def create(self, kind: str, repo: str, private: bool) -> bool:
        with self.lock:
            d = self.repo_dir(kind, repo)
            if (d / "repo.json").exists():
                return False
            (d / "commits").mkdir(parents=True)
            (d / "blobs").mkdir()
            meta = {"private": private, "branches": {}, "created": time.time()}
            (d / "repo.json").write_text(json.dumps(meta))
            sha = self._write_commit(kind, repo, None, {}, {".gitattributes": GITATTRIBUTES},
                                     [], "initial commit")
            meta["branches"]["main"] = sha
            (d / "repo.json").write_text(json.dumps(meta))
            return True

    def resolve(self, kind: str, repo: str, revision: str) -> str:
        meta = self.meta(kind, repo)
        if revision in meta["branches"]:
            return meta["branches"][revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and (
                self.repo_dir(kind, repo) / "commits" / f"{revision}.json").exists():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, kind: str, repo: str, sha: str) -> dict:
        return json.loads((self.repo_dir(kind, repo) / "commits" / f"{sha}.json").read_text())

    def tree(self, kind: str, repo: str, revision: str) -> tuple[str, dict]:
        sha = self.resolve(kind, repo, revision)
        return sha, self.commit(kind, repo, sha)["tree"]

    def blob(self, kind: str, repo: str, digest: str) -> Path:
        return self.repo_dir(kind, repo) / "blobs" / digest

    def add_commit(self, kind: str, repo: str, branch: str, files: dict[str, bytes | tuple],
                   deleted: list[str], message: str, parent: str | None) -> str:
        with self.lock:
            head = self.resolve(kind, repo, branch)
            if parent and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(self.commit(kind, repo, head)["tree"])
            sha = self._write_commit(kind, repo, head, tree, files, deleted, message)
            meta = self.meta(kind, repo)
            meta["branches"][branch] = sha
            (self.repo_dir(kind, repo) / "repo.json").write_text(json.dumps(meta))
            return sha

    def _write_commit(self, kind, repo, parent, tree, files, deleted, message) -> str:
        for path in deleted:
            doomed = [p for p in tree if p == path or p.startswith(path.rstrip("/") + "/")]
            if not doomed:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del tree[p]
        for path, data in files.items():
            if isinstance(data, tuple):  # ("lfs", sha256): an object uploaded through LFS
                digest = data[1]
                blob = self.blob(kind, repo, digest)
                if not blob.exists():
                    raise HubError(400, f"LFS object {digest} of {path} was never uploaded")
                size = blob.stat().st_size
                tree[path] = {"sha256": digest, "size": size,
                              "oid": git_oid(lfs_pointer(digest, size)), "lfs": True}
                continue
            digest = hashlib.sha256(data).hexdigest()
            self.blob(kind, repo, digest).write_bytes(data)
            tree[path] = {"sha256": digest, "size": len(data), "oid": git_oid(data)}
        body = {"parent": parent, "tree": dict(sorted(tree.items())), "message": message,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        sha = hashlib.sha1(json.dumps({**body, "t": time.time_ns()}).encode()).hexdigest()
        (self.repo_dir(kind, repo) / "commits" / f"{sha}.json").write_text(json.dumps(body))
        return sha

    def create_branch(self, kind: str, repo: str, branch: str, start: str | None) -> None:
        with self.lock:
            meta = self.meta(kind, repo)
            if branch in meta["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            meta["branches"][branch] = self.resolve(kind, repo, start or "main")
            (self.repo_dir(kind, repo) / "repo.json").write_text(json.dumps(meta))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, *args) -> None:  # quiet: tests read their own output
        pass

    # -- plumbing ------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _body(self) -> bytes:
        return self.body

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _access(self) -> str:
        """'write', 'read' or 'anonymous'; an unknown token is refused outright (401)."""
        token = self._token()
        if token is None:
            return "write" if self.server.open else "anonymous"
        if token in self.server.write_tokens or self.server.open:
            return "write"
        if token in self.server.read_tokens:
            return "read"
        raise HubError(401, "Invalid credentials in Authorization header")

    def _may_write(self) -> None:
        access = self._access()
        if access == "anonymous":
            raise HubError(401, "You must be authenticated to write")
        if access != "write":
            raise HubError(403, "You don't have the rights to write to this repo (read token)")

    def _may_read(self, kind: str, repo: str) -> dict:
        meta = self.server.store.meta(kind, repo)
        if meta["private"] and self._access() == "anonymous":
            raise HubError(401, f"Repository {repo} not found (private?)", "RepoNotFound")
        return meta

    def _dispatch(self) -> None:
        # read the whole body first: an unread one would corrupt the next request
        # on this keep-alive connection
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self._route(urllib.parse.urlsplit(self.path))
        except HubError as err:
            headers = {"X-Error-Code": err.code} if err.code else {}
            headers["X-Error-Message"] = err.message
            self._json(err.status, {"error": err.message}, headers)

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = lambda self: self._dispatch()  # noqa: E731

    # -- routes --------------------------------------------------------------------------
    def _route(self, url) -> None:
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        method = self.command
        self._access()  # an unknown token is refused whatever it asks for
        if path == "/api/whoami-v2":
            access = self._access()
            if access == "anonymous":
                raise HubError(401, "Invalid user token")
            return self._json(200, {"type": "user", "name": "zoo-test", "orgs": [],
                                    "auth": {"accessToken": {"role": access}}})
        if path == "/api/validate-yaml" and method == "POST":
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(self._body() or b"{}"))
        if path in ("/api/models", "/api/datasets") and method == "GET":
            return self._list(path.removeprefix("/api/").rstrip("s"), query)
        m = re.fullmatch(r"/api/" + _REPO + r"(?:/revision/(?P<rev>.+))?", url.path)
        if m and method == "GET":
            return self._info(m["type"], urllib.parse.unquote(m["repo"]),
                              urllib.parse.unquote(m["rev"] or "main"))
        m = re.fullmatch(r"/api/" + _REPO + r"/(?P<verb>tree|preupload|commit|branch|"
                         r"paths-info|refs)(?:/(?P<rest>.*))?", url.path)
        if m:
            kind, repo = m["type"], urllib.parse.unquote(m["repo"])
            rest = urllib.parse.unquote(m["rest"] or "")
            handler = getattr(self, "_" + m["verb"].replace("-", "_"))
            return handler(kind, repo, rest, query)
        m = re.fullmatch(r"/(?:(?P<ds>datasets)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch",
                         url.path)
        if m and method == "POST":
            return self._lfs_batch("dataset" if m["ds"] else "model", urllib.parse.unquote(m["repo"]))
        m = re.fullmatch(r"/lfs/(?P<type>model|dataset)/(?P<repo>[^/]+/[^/]+)/(?P<verb>upload|verify)"
                         r"/(?P<oid>[0-9a-f]{64})", url.path)
        if m and method in ("PUT", "POST"):
            return self._lfs_object(m["type"], urllib.parse.unquote(m["repo"]), m["verb"], m["oid"])
        m = re.fullmatch(r"/(?:(?P<ds>datasets)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rest>.+)",
                         url.path)
        if m and method in ("GET", "HEAD"):
            return self._resolve("dataset" if m["ds"] else "model",
                                 urllib.parse.unquote(m["repo"]), m["rest"])
        raise HubError(404, f"no route for {method} {path}")

    def _list(self, kind: str, query: dict) -> None:
        """The repos of a kind, as the Hub lists them: ``author`` and ``search`` (a part of
        the id) narrow it, private ones only for a token, ``page_size`` a page, the next
        page's address in a Link header."""
        author, search = query.get("author", [None])[0], query.get("search", [""])[0]
        start = int(query.get("cursor", ["0"])[0])
        store = self.server.store.root / f"{kind}s"
        ids = sorted(f"{org.name}/{repo.name}" for org in store.glob("*") if org.is_dir()
                     for repo in org.iterdir() if (repo / "repo.json").exists())
        found = [r for r in ids if (author is None or r.split("/")[0] == author)
                 and search.lower() in r.lower()
                 and not (self.server.store.meta(kind, r)["private"] and
                          self._access() == "anonymous")]
        page = found[start:start + self.server.page_size]
        headers = {}
        if start + self.server.page_size < len(found):
            rest = {k: v[0] for k, v in query.items() if k != "cursor"}
            rest["cursor"] = str(start + self.server.page_size)
            headers["Link"] = (f'<{self.server.url}/api/{kind}s?'
                               f'{urllib.parse.urlencode(rest)}>; rel="next"')
        self._json(200, [{"id": r, "modelId": r, "private": self.server.store.meta(
            kind, r)["private"], "tags": []} for r in page], headers)

    def _create_repo(self, body: dict) -> None:
        self._may_write()
        kind = body.get("type") or "model"
        repo = f"{body.get('organization') or 'zoo-test'}/{body['name']}"
        url = f"{self.server.url}/{'datasets/' if kind == 'dataset' else ''}{repo}"
        private = bool(body.get("private")) or body.get("visibility") == "private"
        if not self.server.store.create(kind, repo, private):
            return self._json(409, {"error": "You already created this repo", "url": url},
                              {"X-Error-Message": "You already created this repo"})
        self._json(200, {"url": url, "name": repo, "id": repo})

    def _info(self, kind: str, repo: str, revision: str) -> None:
        meta = self._may_read(kind, repo)
        sha, tree = self.server.store.tree(kind, repo, revision)
        siblings = [{"rfilename": p, "size": f["size"], "blobId": f["oid"],
                     **({"lfs": {"sha256": f["sha256"], "size": f["size"],
                                 "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}}
                        if f.get("lfs") else {})}
                    for p, f in tree.items()]
        info = {"id": repo, "sha": sha, "private": meta["private"],
                "siblings": siblings, "tags": [], "downloads": 0, "likes": 0,
                "lastModified": self.server.store.commit(kind, repo, sha)["date"]}
        card = self._card_data(kind, repo, tree)
        if card is not None:  # as the Hub: the README's YAML metadata, parsed
            info["cardData"] = card
        self._json(200, info)

    def _card_data(self, kind: str, repo: str, tree: dict) -> dict | None:
        import yaml

        if "README.md" not in tree:
            return None
        text = self.server.store.blob(kind, repo, tree["README.md"]["sha256"]).read_text(
            errors="replace")
        found = re.match(r"---\n(.*?)\n---", text, re.S)
        try:
            data = yaml.safe_load(found[1]) if found else None
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def _tree(self, kind: str, repo: str, rest: str, query) -> None:
        self._may_read(kind, repo)
        revision, _, prefix = rest.partition("/")
        _sha, tree = self.server.store.tree(kind, repo, revision or "main")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, dirs = [], set()
        for p, f in tree.items():
            if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                continue
            inner = p[len(prefix.rstrip("/")) + 1:] if prefix else p
            if "/" in inner and not recursive:
                dirs.add((prefix.rstrip("/") + "/" if prefix else "") + inner.split("/")[0])
                continue
            entries.append(_file_record(p, f))
        entries += [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(dirs)]
        self._json(200, entries)

    def _paths_info(self, kind: str, repo: str, rest: str, query) -> None:
        self._may_read(kind, repo)
        _sha, tree = self.server.store.tree(kind, repo, rest or "main")
        body = self._body().decode()
        try:
            paths = json.loads(body)["paths"]
        except (json.JSONDecodeError, KeyError):
            paths = urllib.parse.parse_qs(body).get("paths", [])
        self._json(200, [_file_record(p, tree[p]) for p in paths if p in tree])

    def _refs(self, kind: str, repo: str, rest: str, query) -> None:
        meta = self._may_read(kind, repo)
        self._json(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                      for b, s in meta["branches"].items()],
                         "tags": [], "converts": []})

    def _branch(self, kind: str, repo: str, rest: str, query) -> None:
        self._may_write()
        start = json.loads(self._body() or b"{}").get("startingPoint")
        self.server.store.create_branch(kind, repo, rest, start)
        self._json(200, {})

    def _preupload(self, kind: str, repo: str, rest: str, query) -> None:
        self._may_write()
        self._may_read(kind, repo)
        _sha, tree = self.server.store.tree(kind, repo, rest or "main")
        files = json.loads(self._body())["files"]
        self._json(200, {"files": [{"path": f["path"], "uploadMode": _upload_mode(f),
                                    "shouldIgnore": False,
                                    "oid": _remote_oid(tree.get(f["path"]))} for f in files]})

    def _commit(self, kind: str, repo: str, rest: str, query) -> None:
        self._may_write()
        self._may_read(kind, repo)
        header, files, deleted = {}, {}, []
        for line in self._body().decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise HubError(400, f"unsupported LFS hash algorithm {value.get('algo')}")
                files[value["path"]] = ("lfs", value["oid"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(400, f"this test Hub does not support {key} operations")
        branch = rest or "main"
        sha = self.server.store.add_commit(kind, repo, branch, files, deleted,
                                           header.get("summary", ""), header.get("parentCommit"))
        prefix = f"{self.server.url}/{'datasets/' if kind == 'dataset' else ''}{repo}"
        self._json(200, {"commitUrl": f"{prefix}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None})

    def _resolve(self, kind: str, repo: str, rest: str) -> None:
        self._may_read(kind, repo)
        revision, _, file_path = rest.partition("/")
        sha, tree = self.server.store.tree(kind, repo, urllib.parse.unquote(revision))
        file_path = urllib.parse.unquote(file_path)
        if file_path not in tree:
            raise HubError(404, f"Entry not found: {file_path}", "EntryNotFound")
        record = tree[file_path]
        data = self.server.store.blob(kind, repo, record["sha256"]).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{record["oid"]}"', "Accept-Ranges": "bytes"}
        if record.get("lfs"):  # as the Hub: the object's sha256 is its ETag
            headers.update({"ETag": f'"{record["sha256"]}"',
                            "X-Linked-Etag": f'"{record["sha256"]}"',
                            "X-Linked-Size": str(record["size"])})
        if self.server.tamper.get(f"{repo}/{file_path}"):  # other bytes than listed
            data = self.server.tamper[f"{repo}/{file_path}"]
        self.server.downloads.append((self.command, f"{repo}/{file_path}",
                                      self.headers.get("Range")))
        if self.command == "GET" and self.server.cut_short.pop(f"{repo}/{file_path}", None):
            return self._cut_short(data, headers)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged[1])
            end = int(ranged[2]) if ranged[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")


    def _lfs_batch(self, kind: str, repo: str) -> None:
        """The Git LFS batch API: an upload and a verify action per object not stored yet."""
        self._may_write()
        self._may_read(kind, repo)
        request = json.loads(self._body() or b"{}")
        if request.get("operation") != "upload":
            raise HubError(400, "this test Hub answers LFS uploads only")
        objects = []
        for obj in request.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size,
                                "error": {"code": 422, "message": "invalid oid"}})
                continue
            record = {"oid": oid, "size": size, "authenticated": True}
            if not self.server.store.blob(kind, repo, oid).exists():
                base = f"{self.server.url}/lfs/{kind}/{repo}"
                record["actions"] = {"upload": {"href": f"{base}/upload/{oid}"},
                                     "verify": {"href": f"{base}/verify/{oid}"}}
            objects.append(record)
        self.server.lfs_batches += 1
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_object(self, kind: str, repo: str, verb: str, oid: str) -> None:
        """PUT of an object's bytes (checked against its sha256), then POST to verify it."""
        self.server.store.meta(kind, repo)
        blob = self.server.store.blob(kind, repo, oid)
        if verb == "upload":
            if hashlib.sha256(self.body).hexdigest() != oid:
                raise HubError(400, "the uploaded bytes do not hash to the object id")
            # whole or not at all: the same object may be uploaded twice at once (two files
            # of one commit with the same bytes), and a verify must never see half of it
            part = blob.with_name(f"{blob.name}.{threading.get_ident()}.part")
            part.write_bytes(self.body)
            os.replace(part, blob)
            self.server.lfs_uploads.append(f"{repo}:{oid[:12]}")
            return self._send(200)
        self._may_write()
        size = json.loads(self._body() or b"{}").get("size")
        if not blob.exists() or (size is not None and blob.stat().st_size != size):
            raise HubError(404, f"LFS object {oid} is not stored (or its size differs)")
        self._json(200, {})

    def _cut_short(self, data: bytes, headers: dict) -> None:
        """Promise the whole file, send half, drop the connection: a broken download."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)


def _file_record(path: str, f: dict) -> dict:
    record = {"type": "file", "path": path, "size": f["size"], "oid": f["oid"]}
    if f.get("lfs"):
        record["lfs"] = {"oid": f["sha256"], "size": f["size"],
                         "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}
    return record


def _remote_oid(f: dict | None) -> str | None:
    """What preupload calls a stored file's oid: its sha256 when in LFS, else its git blob id
    (the client compares it with its own file's to skip unchanged ones)."""
    if f is None:
        return None
    return f["sha256"] if f.get("lfs") else f["oid"]


def _upload_mode(file: dict) -> str:
    """As the Hub's default .gitattributes: weights and large files go through LFS."""
    large = int(file.get("size") or 0) >= LFS_MIN_SIZE
    return "lfs" if large or file["path"].endswith(LFS_SUFFIXES) else "regular"


class HubServer(ThreadingHTTPServer):
    """The server; ``cut_short`` ("ORG/NAME/path" -> True) breaks the next download of a
    file halfway, ``tamper`` ("ORG/NAME/path" -> bytes) serves other bytes than the file
    the listing describes, ``downloads`` records (method, file, Range header) of each one,
    ``lfs_uploads`` each object uploaded through LFS."""

    daemon_threads = True

    def __init__(self, root: Path, port: int = 0, host: str = "127.0.0.1",
                 write_tokens=(), read_tokens=()):
        super().__init__((host, port), Handler)
        self.store = Store(root)
        self.write_tokens, self.read_tokens = set(write_tokens), set(read_tokens)
        self.open = not self.write_tokens and not self.read_tokens
        self.url = f"http://{host}:{self.server_address[1]}"
        self.cut_short: dict[str, bool] = {}
        self.tamper: dict[str, bytes] = {}  # "ORG/NAME/path" -> bytes served instead
        self.downloads: list[tuple[str, str, str | None]] = []
        self.lfs_batches = 0
        self.lfs_uploads: list[str] = []
        self.page_size = 1000  # repos per page of a listing

    def start(self) -> HubServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", action="append", default=[], help="a write token")
    parser.add_argument("--read-token", action="append", default=[])
    args = parser.parse_args()
    server = HubServer(args.root, args.port, args.host, args.token, args.read_token)
    print(f"test Hub serving {args.root} at {server.url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
