"""`serve_files`: a local HTTP server, a stand-in for a host on the internet that serves images
(and files that are none) at the URLs of an edit's `image` or `mask`."""

from __future__ import annotations

import contextlib
import http.server
import mimetypes
import threading
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def serve_files(bodies: Mapping[str, bytes]) -> Iterator[str]:
    """Serves `bodies` (path -> bytes; any other path is a 404) on 127.0.0.1; yields the base
    URL, `http://127.0.0.1:<port>`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies.get(self.path)
            self.send_response(200 if body is not None else 404)
            kind = mimetypes.guess_type(self.path)[0] or "application/octet-stream"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
