"""A stand-in provider for the image test: an OAuth2 token endpoint and an upstream, over TLS,
on 127.0.0.1:8443 inside the pod. Standard library only (the test's tools image has python3).

POST /oauth/token          client credentials (form): the right secret gets a one-hour token
GET|POST /payu/<anything>  the upstream: 200 with what it got, if the token is one it issued
GET /payu/slow             the same, after 3 s (an in-flight request across a SIGTERM)
"""

import json
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = sys.argv[1]
CERT, KEY = sys.argv[2], sys.argv[3]
issued = set()
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode()
        if self.path == "/oauth/token":
            form = urllib.parse.parse_qs(body)
            if form.get("client_secret") != [SECRET]:
                return self.answer(401, {"error": "invalid_client"})
            with lock:
                token = "pod-token-%d" % (len(issued) + 1)
                issued.add(token)
            return self.answer(200, {"access_token": token, "expires_in": 3600})
        return self.upstream(len(body))

    def do_GET(self):
        return self.upstream(0)

    def upstream(self, received):
        token = (self.headers.get("authorization") or "").removeprefix("Bearer ")
        with lock:
            known = token in issued
        if not self.path.startswith("/payu/") or not known:
            return self.answer(401, {"error": "invalid_token"})
        if self.path == "/payu/slow":
            time.sleep(3)
        return self.answer(200, {"path": self.path, "token": token, "bytes": received})

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 8443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("stand-in provider on https://127.0.0.1:8443", flush=True)
server.serve_forever()
