"""A local stand-in for the Hugging Face Hub: the few endpoints `create_repo` and `upload_folder` call.

Runs on 127.0.0.1 in a thread; point `HF_ENDPOINT` at `url`. Commits are kept (path -> bytes) for the test to
read; `fail_commits` answers commits with a server error, and only `token` is accepted.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAMESPACE = "tester"


class HubServer:
    def __init__(self, token: str) -> None:
        self.token = token
        self.fail_commits = False
        self.commits: list[dict[str, bytes]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args) -> None:  # quiet
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self.reply(401, {"error": "Invalid username or password."})
                    return
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    name = json.loads(body)["name"]
                    self.reply(200, {"url": f"{hub.url}/{NAMESPACE}/{name}", "name": f"{NAMESPACE}/{name}"})
                elif path == "/api/validate-yaml":
                    self.reply(200, {"errors": [], "warnings": []})
                elif "/preupload/" in path:
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    self.reply(200, {"files": modes})
                elif "/commit/" in path:
                    if hub.fail_commits:
                        self.reply(
                            500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"}
                        )
                        return
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {
                        line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines
                        if line["key"] == "file"
                    }
                    hub.commits.append(files)
                    oid = f"{len(hub.commits):040x}"
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
                else:
                    self.reply(404, {"error": f"not served here: {path}"})

        return Handler
