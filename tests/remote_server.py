"""A range-capable HTTP server on 127.0.0.1 for the remote tests: plain files under ``/files/``
and a fake Hugging Face hub (the revision lookup and ``resolve`` routes paramsurgeon calls).
It counts every request and the file bytes it sends, so that the tests measure at the server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class Server:
    """``root/files/...`` served as files; ``root/hub/ORG/REPO/REVISION/...`` as hub repositories.

    ``mode``: None, 'ignore-range' (200 and the whole file), 'truncate' (half the promised bytes);
    ``token``: when set, a request without 'Bearer TOKEN' gets 401; ``redirect_to``: another server's
    address, where hub files are redirected (as the hub sends them to its CDN)."""

    def __init__(self, root, certificate: tuple[str, str] | None = None):
        self.root, self.mode, self.token = str(root), None, None
        self.redirect_to: str | None = None  # hub files: a redirect to this server's /files/model/
        self.requests: list[str] = []
        self.authorizations: list[str | None] = []
        self.sent = 0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        scheme = "http"
        if certificate is not None:  # https with this (certificate file, key file)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.requests, self.sent, self.authorizations = [], 0, []

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with server._lock:
                    server.requests.append(self.path)
                    server.authorizations.append(self.headers.get("Authorization"))
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._reply(401, b"unauthorized")
                path = unquote(urlsplit(self.path).path)
                hub = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
                if hub:
                    return self._revision(hub[1], hub[2])
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if resolve and server.redirect_to:
                    return self._reply(302, b"", extra={"Location": f"{server.redirect_to}/files/model/{resolve[3]}"})
                if resolve:
                    return self._file(self._commit_folder(resolve[1], resolve[2]), resolve[3])
                if path.startswith("/files/"):
                    return self._file(os.path.join(server.root, "files"), path[len("/files/"):])
                self._reply(404, b"not found")

            def _revision(self, repo, revision):
                folder = os.path.join(server.root, "hub", repo, revision)
                if not os.path.isdir(folder):
                    return self._reply(404, b'{"error": "Repository not found"}')
                siblings = [{"rfilename": os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/"),
                             "size": os.path.getsize(os.path.join(d, f))}
                            for d, _, names in os.walk(folder) for f in sorted(names)]
                body = json.dumps({"id": repo, "sha": _commit(repo, revision), "siblings": siblings}).encode()
                self._reply(200, body, "application/json")

            def _commit_folder(self, repo, commit):
                base = os.path.join(server.root, "hub", repo)
                for revision in os.listdir(base) if os.path.isdir(base) else []:
                    if _commit(repo, revision) == commit:
                        return os.path.join(base, revision)
                return None

            def _file(self, folder, name):
                path = os.path.join(folder, name) if folder else None
                if path is None or not os.path.isfile(path):
                    return self._reply(404, b"not found")
                size = os.path.getsize(path)
                wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                with open(path, "rb") as f:
                    if wanted is None or server.mode == "ignore-range":
                        return self._reply(200, f.read(), count=True)
                    start = int(wanted[1])
                    end = min(int(wanted[2]) if wanted[2] else size - 1, size - 1)
                    if start >= size:
                        return self._reply(416, b"", extra={"Content-Range": f"bytes */{size}"})
                    f.seek(start)
                    self._reply(206, f.read(end + 1 - start), count=True,
                                extra={"Content-Range": f"bytes {start}-{end}/{size}"})

            def _reply(self, status, body, kind="application/octet-stream", count=False, extra=None):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if server.mode == "truncate" and count:
                    body = body[:len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)
                if count:
                    with server._lock:
                        server.sent += len(body)

        return Handler


def _commit(repo: str, revision: str) -> str:
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


def self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by itself, and its key: (certificate file, key file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_file, key_file = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_file, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_file, key_file
