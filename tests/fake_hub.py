"""A stand-in for the Hub's HTTP API on 127.0.0.1: records what huggingface_hub sends, no network."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, user="alice", orgs=("acme",), token="hf_good"):
        self.user, self.orgs, self.token = user, list(orgs), token
        self.requests: list[tuple[str, str]] = []
        self.repos: set[str] = set()
        self.commits: list[dict] = []  # {"repo", "files": {path: bytes}}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self):
                return self.headers.get("Authorization") == f"Bearer {hub.token}"

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if self.path.startswith("/api/whoami-v2"):
                    if not self._authorized():
                        return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return self._reply(200, {"name": hub.user, "type": "user", "orgs": [{"name": o} for o in hub.orgs]})
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self._authorized():
                    return self._reply(401, {"error": "unauthorized"})
                if self.path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    namespace = payload.get("organization") or hub.user
                    if namespace not in [hub.user, *hub.orgs]:
                        return self._reply(403, {"error": f"You don't have the rights to create a model under {namespace}"})
                    repo = f"{namespace}/{payload['name']}"
                    hub.repos.add(repo)
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    files = {}
                    for line in body.decode().splitlines():
                        op = json.loads(line)
                        if op["key"] == "file":
                            files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                    hub.commits.append({"repo": repo, "files": files})
                    return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40, "pullRequestUrl": None})
                self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
