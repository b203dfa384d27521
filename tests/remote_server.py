"""A range-capable HTTP server on 127.0.0.1 for the remote tests and the benchmark: plain files
under ``/files/`` and a fake Hugging Face hub (the revision lookup, and ``resolve`` with the headers
and the CDN redirect of the real one, for GET and HEAD: the routes paramsurgeon and huggingface_hub call).
It counts every request and the file bytes it sends, so that the tests measure at the server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class Server:
    """``root/files/...`` served as files; ``root/hub/ORG/REPO/REVISION/...`` as hub repositories.

    ``mode``: None, 'ignore-range' (200 and the whole file), 'truncate' (half the promised bytes);
    ``token``: when set, a request without 'Bearer TOKEN' gets 401; ``redirect_to``: another server's
    address, where hub weight files are redirected (as the hub sends them to its CDN: a presigned
    address under ``/cdn/``, refused without its signature); ``signed``: when set, ``/files/``
    answers 403 to a request whose query lacks ``sig=SIGNED`` (a presigned address); ``delay``:
    seconds each reply waits (a distant server), ``most_at_once``: the most requests it has
    answered at the same time; ``signature_uses``: as a CDN, how many requests one presigned
    address serves before it answers 403 (expired)."""

    def __init__(self, root, certificate: tuple[str, str] | None = None):
        self.root, self.mode, self.token = str(root), None, None
        self.redirect_to: str | None = None
        self.signed: str | None = None
        self.delay, self.most_at_once, self._at_once = 0.0, 0, 0
        self.issued, self.uses, self.signature_uses = 0, {}, None  # CDN addresses given, and their uses
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
            self.requests, self.sent, self.authorizations, self.most_at_once = [], 0, [], 0

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
                self._route(head=False)

            def do_HEAD(self):  # huggingface_hub asks a hub file's metadata with HEAD
                self._route(head=True)

            def _route(self, head):
                self.head = head
                with server._lock:
                    server.requests.append(self.path)
                    server.authorizations.append(self.headers.get("Authorization"))
                    server._at_once += 1
                    server.most_at_once = max(server.most_at_once, server._at_once)
                try:
                    time.sleep(server.delay)
                    self._answer()
                finally:
                    with server._lock:
                        server._at_once -= 1

            def _answer(self):
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._reply(401, b"unauthorized")
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                hub = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
                if hub:
                    return self._revision(hub[1], hub[2])
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if resolve:
                    return self._resolve(*resolve.groups())
                cdn = re.fullmatch(r"/cdn/([^/]+/[^/]+)/([0-9a-f]+)/(.+)", path)
                if cdn:
                    query = parse_qs(parts.query)
                    issued = query.get("X-Amz-Date", [""])[0]
                    if query.get("X-Amz-Signature") != [_signature(*cdn.groups(), issued)]:
                        return self._reply(403, b"signature does not match")
                    with server._lock:
                        server.uses[issued] = server.uses.get(issued, 0) + 1
                        if server.signature_uses is not None and server.uses[issued] > server.signature_uses:
                            return self._reply(403, b"Request has expired")
                    return self._file(self._folder(cdn[1], cdn[2]), cdn[3])
                if path.startswith("/files/"):
                    if server.signed and parse_qs(parts.query).get("sig") != [server.signed]:
                        return self._reply(403, b"no valid signature")
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

            def _resolve(self, repo, revision, name):
                """A hub file: weights (LFS) redirected to the CDN when ``redirect_to`` is set, the
                rest served here; with the headers huggingface_hub reads (commit, etag, size)."""
                folder = self._folder(repo, revision)
                path = os.path.join(folder, name) if folder else None
                if path is None or not os.path.isfile(path):
                    return self._reply(404, b"Entry not found", extra={"X-Error-Code": "EntryNotFound"})
                commit = _commit(repo, os.path.basename(folder))
                etag = f'"{hashlib.sha1(f"{commit}/{name}".encode()).hexdigest()}"'
                hub = {"X-Repo-Commit": commit, "ETag": etag}
                if server.redirect_to and not name.endswith(".json"):
                    with server._lock:
                        server.issued += 1
                        issued = str(server.issued)
                    location = f"{server.redirect_to}/cdn/{repo}/{commit}/{name}?X-Amz-Date={issued}" \
                               f"&X-Amz-Expires=3600&X-Amz-Signature={_signature(repo, commit, name, issued)}"
                    return self._reply(302, b"", extra={**hub, "Location": location, "X-Linked-Etag": etag,
                                                        "X-Linked-Size": str(os.path.getsize(path))})
                self._file(folder, name, hub)

            def _folder(self, repo, revision):
                """The folder of a hub revision, named by its name or its commit."""
                base = os.path.join(server.root, "hub", repo)
                for name in os.listdir(base) if os.path.isdir(base) else []:
                    if revision in (name, _commit(repo, name)):
                        return os.path.join(base, name)
                return None

            def _file(self, folder, name, extra=None):
                path = os.path.join(folder, name) if folder else None
                if path is None or not os.path.isfile(path):
                    return self._reply(404, b"not found")
                size = os.path.getsize(path)
                wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                with open(path, "rb") as f:
                    if wanted is None or server.mode == "ignore-range":
                        return self._reply(200, (f, size), extra=extra)
                    start = int(wanted[1])
                    end = min(int(wanted[2]) if wanted[2] else size - 1, size - 1)
                    if start >= size:
                        return self._reply(416, b"", extra={"Content-Range": f"bytes */{size}"})
                    f.seek(start)
                    self._reply(206, (f, end + 1 - start),
                                extra={**(extra or {}), "Content-Range": f"bytes {start}-{end}/{size}"})

            def _reply(self, status, body, kind="application/octet-stream", extra=None):
                """Send ``body``: bytes, or (an open file, how many of its bytes) for file contents, which
                are counted and sent a MiB at a time (half of them in 'truncate' mode)."""
                source, length = body if isinstance(body, tuple) else (None, len(body))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(length))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.head:
                    return
                if source is None:
                    return self.wfile.write(body)
                if server.mode == "truncate":
                    length //= 2
                    self.close_connection = True
                left = length
                while left:
                    chunk = source.read(min(left, 1 << 20))
                    self.wfile.write(chunk)
                    left -= len(chunk)
                with server._lock:
                    server.sent += length

        return Handler


def _commit(repo: str, revision: str) -> str:
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


def _signature(repo: str, commit: str, name: str, issued: str) -> str:
    """The signature a CDN address of a hub file carries in its query (as the hub's presigned ones)."""
    return hashlib.sha256(f"{repo}/{commit}/{name}/{issued}".encode()).hexdigest()[:32]


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
