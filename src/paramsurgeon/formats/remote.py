"""Checkpoints at URLs: ``https://`` (and ``http://``), ``hf://ORG/REPO[@REV][/PATH]`` and
``s3://BUCKET/KEY``, read as ``InputFile``s whose reads are ranged requests, so that every
format reader works unchanged.

A file's first request fetches its first 64 KiB (a JSON file: its first MiB) and learns its
size from the reply, so that a safetensors header costs one request, two when it is larger;
small reads are served from what was fetched, tensor values are fetched when read. A hub
repository is looked up once (its commit, file names and sizes in one request) and its files
are then read at that commit; where the hub redirects a file to its CDN, the address it gives is
kept for the file's later reads. Credentials come from the environment and are never printed.

What is looked up lasts as long as one ``Remote`` (a command's Loader owns one, formats/loader.py):
the module's functions answer for the Remote active in the caller's context, or, outside any,
for a Remote of their own that keeps nothing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import http.client
import io
import os
import re
import ssl
import sys
import tempfile
import threading
import urllib.parse

from ..errors import CorruptCheckpointError, InputError
from .files import InputFile

_BLOCK = 64 << 10  # the first read of a file, and the least one fetched
_JSON_BLOCK = 1 << 20  # an index or config.json is fetched whole in one request up to this
_SPANS = 8  # blocks kept for later small reads: the file's first one and the latest ones
_TIMEOUT = 60
_REDIRECTS = 5
_PARALLEL = 8  # files opened at once (a checkpoint's shards: their headers fetched side by side)
_RETRY_DIRECT = (401, 403, 404, 410)  # a kept redirect target that answers this has expired: ask again
_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")  # where get_token looks first
# query keys of a signed address (S3/GCS presigned, CloudFront, Azure SAS): its own credential, no token helps
_SIGNATURE_KEYS = {"x-amz-signature", "x-goog-signature", "signature", "sig", "expires", "x-amz-expires"}
_HF = re.compile(r"hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.*))?$")


class RemoteError(InputError):
    """A remote file that cannot be read: not found, no access, no connection, cut short."""


class Remote:
    """One command's remote reading: the files opened (None for one found missing), the hub
    repositories looked up, the s3fs filesystem (with its process id), the connections kept alive
    per process, thread and host, and where redirects led (the address asked -> the one that
    answered). With ``download``, a server that ignores Range requests is read by downloading
    whole files (otherwise refused)."""

    def __init__(self, download: bool = False):
        self.download = download
        self.files: dict[str, RemoteFile | None] = {}
        self.repos: dict[tuple[str, str | None], _HubRepo] = {}
        self.s3fs: tuple[int, object] | None = None
        self.connections: dict[tuple, http.client.HTTPConnection] = {}
        self.redirects: dict[str, str] = {}

    @contextlib.contextmanager
    def active(self):
        """Within this, the module's functions use this Remote."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    def drop_connections(self) -> None:
        """Close this thread's kept connections (one cut short is unusable; a later request opens a
        new one); other threads' and processes' are theirs."""
        mine = (os.getpid(), threading.get_ident())
        for key in [key for key in self.connections if key[:2] == mine]:
            self.connections.pop(key).close()


_active: contextvars.ContextVar[Remote | None] = contextvars.ContextVar("paramsurgeon_remote", default=None)


def _current() -> Remote:
    """The Remote active here; outside any, a new one that keeps nothing for a later call."""
    return _active.get() or Remote()


class RemoteFile(InputFile):
    """A remote file read by ranged requests; spans fetched once are kept while small."""

    def __init__(self, url: str, fetch, size: int, first: bytes):
        self.fd, self.name, self.path = None, url, url
        self.size, self._fetch = size, fetch
        self._spans: list[tuple[int, bytes]] = [(0, first)] if first else []
        self._map = None

    def read(self, offset: int, n: int) -> bytes:
        return bytes(self._bytes(offset, n))

    def view(self, offset: int, n: int) -> memoryview:
        return memoryview(self._bytes(offset, n))

    def stream(self) -> io.BufferedReader:
        """The file as a seekable file object whose reads are ranged (zipfile, pickle)."""
        return io.BufferedReader(_Ranges(self), buffer_size=_BLOCK)

    def _bytes(self, offset: int, n: int) -> bytearray:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise CorruptCheckpointError(
                f"{self.name}: truncated: needs bytes {offset}..{offset + n} but the file has {self.size}")
        for start, data in self._spans:
            if start <= offset and offset + n <= start + len(data):
                return bytearray(data[offset - start:offset - start + n])
        before = b""
        for start, data in self._spans:  # a read that goes on past a kept span fetches only the rest
            if start <= offset < start + len(data):
                before = data[offset - start:]
        begin = offset + len(before)
        end = max(offset + n, min(begin + _BLOCK, self.size)) if n < _BLOCK else offset + n
        fetched = self._fetch(begin, end)
        if n < _BLOCK:  # headers and small tensors; a read of values is fetched as asked, not kept
            self._spans = self._spans[:1] + self._spans[1:][2 - _SPANS:] + [(begin, bytes(fetched))]
        if not before and len(fetched) == n and isinstance(fetched, bytearray):
            return fetched  # a tensor's values: not copied again
        return bytearray(before + fetched[:offset + n - begin])


class _Ranges(io.RawIOBase):
    """A remote file's bytes as a raw seekable stream."""

    def __init__(self, file: RemoteFile):
        self.file, self.position = file, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = max(0, (0, self.position, self.file.size)[whence] + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.file.size - self.position))
        buffer[:n] = self.file.read(self.position, n)
        self.position += n
        return n


def open_remote(url: str) -> RemoteFile:
    """The remote file at ``url``, opened once (its first block fetched)."""
    remote = _current()
    if remote.files.get(url) is None:
        file = _open(remote, url)
        if file is None:
            raise RemoteError(f"{url}: not found (HTTP 404); check the URL")
        remote.files[url] = file
    return remote.files[url]


def open_many(urls: list[str]) -> None:
    """Open the remote files at ``urls`` side by side on a few threads, so that reading a
    checkpoint's shard headers takes about one request's time, not one a shard (the same
    requests). What fails is left for the reads that follow to raise."""
    remote = _current()
    todo = [url for url in dict.fromkeys(urls) if url not in remote.files]
    if len(todo) < 2:
        return
    is_file(todo[0])  # a hub repository is looked up once, here, not by every thread
    todo = [url for url in todo if url not in remote.files]

    def one(url: str):
        try:
            remote.files[url] = _open(remote, url)
        except InputError:
            pass

    with concurrent.futures.ThreadPoolExecutor(min(_PARALLEL, len(todo))) as pool:
        list(pool.map(one, todo))


def is_file(url: str) -> bool:
    """Whether the remote file at ``url`` exists (a hub file: from the repository's listing;
    otherwise by opening it, which costs the request its first read makes anyway)."""
    remote, hub = _current(), _hub_url(url)
    if hub:
        return _repo(remote, hub).size(hub["path"] or "") is not None
    if url not in remote.files:
        remote.files[url] = _open(remote, url)
    return remote.files[url] is not None


def is_dir(url: str) -> bool:
    """Only a hub repository (or a folder in one) is a remote directory: HTTP cannot list one."""
    hub = _hub_url(url)
    return bool(hub) and _repo(_current(), hub).is_dir(hub["path"] or "")


def list_dir(url: str) -> list[str]:
    """The names in a hub repository's folder."""
    hub = _hub_url(url)
    return _repo(_current(), hub).names(hub["path"] or "")


def _hub_url(url: str) -> re.Match | None:
    """The parts of an hf:// URL; None for another scheme."""
    if not url.startswith("hf://"):
        return None
    match = _HF.match(url)
    if match is None:
        raise RemoteError(f"{url}: a hub URL is hf://ORG/REPO[@REVISION][/PATH] (a model repository)")
    return match


def _open(remote: Remote, url: str) -> RemoteFile | None:
    """Open ``url`` by fetching its first block; None when it does not exist."""
    hub = _hub_url(url)
    if hub:
        repo = _repo(remote, hub)
        size = repo.size(hub["path"] or "")
        if size is None:
            return None
        fetch = _http_fetcher(remote, repo.file_url(hub["path"]), url, repo.headers())
    elif url.startswith("s3://"):
        fetch, size = _s3_fetcher(remote, url), None
    else:
        fetch, size = _http_fetcher(remote, url, url, {}), None
    first = _BLOCK if not urllib.parse.urlsplit(url).path.endswith(".json") else _JSON_BLOCK
    try:
        data, total = fetch(0, first if size is None else min(first, size), size is None)
    except _Missing:
        return None
    return RemoteFile(url, lambda start, end: fetch(start, end)[0], total, data)


class _Missing(Exception):
    """HTTP 404."""


def _http_fetcher(remote: Remote, address: str, url: str, headers: dict):
    """``fetch(start, end, first=False) -> (bytes, file size)``: a ranged GET of ``address``
    (errors name ``url``, the address the user gave)."""
    spooled: list[InputFile] = []

    def fetch(start: int, end: int, first: bool = False) -> tuple[bytes, int]:
        if spooled:
            return spooled[0].read(start, min(end, spooled[0].size) - start), spooled[0].size
        with _answers(remote, url):
            try:
                reply = _get(remote, address, headers, {"Range": f"bytes={start}-{max(end - 1, start)}"})
            except _Status as e:
                if first and e.code == 416:
                    return b"", 0  # an empty file
                if first and e.code == 404:
                    raise _Missing from None
                raise
            if reply.status == 200:
                spooled.append(_download_whole(remote, reply, url))
                return fetch(start, end)
            total = _total(reply.getheader("Content-Range"), url)
            want = min(end, total) - start
            data = _read_exactly(reply, want)
            reply.read()  # the rest, if the server sent more: the connection is then free
        if len(data) < want:
            remote.drop_connections()
            raise RemoteError(f"{url}: the response was cut short ({len(data)} of {want} bytes); try again")
        return data, total

    return fetch


def _get(remote: Remote, address: str, headers: dict, plain: dict | None = None) -> http.client.HTTPResponse:
    """The reply to a GET of ``address`` over a kept connection, redirects followed; ``headers``
    (a token) are not sent on to another host. Where a redirect led is kept, so that the file's
    later reads go there at once (asked again from ``address`` if that answer has expired). An
    error status raises _Status."""
    kept = remote.redirects.get(address)
    if kept is not None:
        try:
            return _follow(remote, kept, _same_host(address, kept, headers), plain)[0]
        except _Status as e:
            if e.code not in _RETRY_DIRECT:
                raise
            del remote.redirects[address]
    reply, final = _follow(remote, address, headers, plain)
    if final != address:
        remote.redirects[address] = final
    return reply


def _follow(remote: Remote, address: str, headers: dict, plain: dict | None) -> tuple[http.client.HTTPResponse, str]:
    """The reply to a GET of ``address``, redirects followed, and the address that gave it."""
    for _ in range(_REDIRECTS + 1):
        reply = _request(remote, urllib.parse.urlsplit(address), {**(plain or {}), **headers})
        location = reply.getheader("Location")
        if reply.status in (301, 302, 303, 307, 308) and location:
            reply.read()
            target = urllib.parse.urljoin(address, location)
            address, headers = target, _same_host(address, target, headers)
            continue
        if reply.status >= 400:
            reply.read()
            raise _Status(reply.status, reply.reason, address)
        return reply, address
    raise _Status(310, f"more than {_REDIRECTS} redirects", address)


def _same_host(address: str, target: str, headers: dict) -> dict:
    """``headers`` (a token) for ``target`` if it is on ``address``'s host; none for another host."""
    return headers if urllib.parse.urlsplit(target).netloc == urllib.parse.urlsplit(address).netloc else {}


def _request(remote: Remote, parts: urllib.parse.SplitResult, headers: dict) -> http.client.HTTPResponse:
    """Send a GET on the connection kept for the host (once more on a new one if the server had
    closed it); a connection that cannot be made raises _NoConnection."""
    key = (os.getpid(), threading.get_ident(), parts.scheme, parts.netloc)  # a forked worker's are its own
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connections = remote.connections
    for again in (True, False):
        kept = connections.get(key)
        connection = kept or _connect(parts)
        connections[key] = connection
        try:
            connection.request("GET", target, headers=headers)
            return connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()
            del connections[key]
            if not (again and kept):
                raise
        except OSError as e:
            connection.close()
            del connections[key]
            raise _NoConnection(getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)) from None
    raise AssertionError("unreachable")


def _connect(parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=_TIMEOUT, context=_tls())
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=_TIMEOUT)


class _Status(Exception):
    """An HTTP error status, and the address that answered it (where redirects led)."""

    def __init__(self, code: int, reason: str, address: str):
        super().__init__(code, reason)
        self.code, self.reason, self.address = code, reason, address


class _NoConnection(Exception):
    """A connection that could not be made (refused, no such host, a certificate refused)."""


@contextlib.contextmanager
def _answers(remote: Remote, url: str, missing: str = "not found (HTTP 404); check the URL"):
    """HTTP and connection errors within, as one line naming ``url``."""
    hint = " (set HF_TOKEN)" if url.startswith("hf://") else ""
    try:
        yield
    except _Status as e:
        if e.code == 404:
            raise RemoteError(f"{url}: {missing}") from None
        if e.code in (401, 403) and _signed(e.address):
            which, then = ("the signed URL", "ask for a new one") if e.address == url else \
                ("the signed URL it was redirected to", "try again")
            raise RemoteError(f"{url}: {which} was refused (HTTP {e.code}: expired or invalid signature); {then}") \
                from None
        if e.code in (401, 403):
            raise RemoteError(f"{url}: access denied (HTTP {e.code}); a token is needed{hint}") from None
        raise RemoteError(f"{url}: the server answered HTTP {e.code} ({e.reason})") from None
    except _NoConnection as e:
        raise RemoteError(f"{url}: cannot connect ({e})") from None
    except (http.client.HTTPException, OSError) as e:
        remote.drop_connections()  # a reply cut short leaves its connection unusable
        raise RemoteError(f"{url}: the response was cut short ({type(e).__name__}); try again") from None


def _signed(address: str) -> bool:
    """Whether ``address``'s query carries a signature of its own (a presigned or CDN address)."""
    keys = urllib.parse.parse_qs(urllib.parse.urlsplit(address).query, keep_blank_values=True)
    return any(key.lower() in _SIGNATURE_KEYS for key in keys)


def _read_exactly(reply, n: int) -> bytearray:
    """Up to ``n`` bytes of ``reply``, read into one buffer (fewer only if the reply ends early)."""
    data = bytearray(n)
    view, done = memoryview(data), 0
    while done < n:
        got = reply.readinto(view[done:])
        if not got:
            del view
            return data[:done]
        done += got
    return data


def _download_whole(remote: Remote, reply, url: str) -> InputFile:
    """A server that ignored the Range request: the whole file in a temporary file, if allowed."""
    if not remote.download:
        raise RemoteError(f"{url}: the server ignores Range requests, so reading anything means downloading"
                          " whole files; pass --download to allow that")
    spool = tempfile.TemporaryFile(prefix="paramsurgeon-download-")
    expected = reply.getheader("Content-Length")
    while chunk := reply.read(1 << 20):
        spool.write(chunk)
    spool.flush()
    file = InputFile(os.dup(spool.fileno()), url, url)
    if expected is not None and int(expected) != file.size:
        raise RemoteError(f"{url}: the response was cut short ({file.size} of {expected} bytes); try again")
    return file


def _total(content_range: str | None, url: str) -> int:
    """The file size a 206 reply states ('bytes 0-65535/123456')."""
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", (content_range or "").strip())
    if match is None:
        raise RemoteError(f"{url}: the server's reply to a Range request gives no file size"
                          f" (Content-Range: {content_range!r})")
    return int(match[1])


def _tls() -> ssl.SSLContext:
    """Certificates checked against the default trust store, or the bundle the environment names."""
    bundle = os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
    return ssl.create_default_context(cafile=bundle or None)


def _s3_fetcher(remote: Remote, url: str):
    """``fetch(start, end, first=False) -> (bytes, file size)``: a ranged GetObject through s3fs,
    with the credentials, region and endpoint of the standard AWS environment."""
    s3fs = _s3(url)
    from fsspec.asyn import sync

    bucket, _, key = url[len("s3://"):].partition("/")

    def filesystem():
        """This process's s3fs filesystem (a forked worker makes its own: its event loop is not
        the parent's), with the environment as it is now."""
        if remote.s3fs is None or remote.s3fs[0] != os.getpid():
            remote.s3fs = (os.getpid(), s3fs.S3FileSystem(skip_instance_cache=True))
        return remote.s3fs[1]

    async def get(fs, start: int, end: int) -> tuple[bytes, str | None, int | None]:
        reply = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{max(end - 1, start)}")
        body = reply["Body"]
        try:
            return await body.read(), reply.get("ContentRange"), reply.get("ContentLength")
        finally:
            body.close()

    def fetch(start: int, end: int, first: bool = False) -> tuple[bytes, int]:
        try:
            fs = filesystem()
            data, content_range, length = sync(fs.loop, get, fs, start, end)
        except FileNotFoundError:
            if first:
                raise _Missing from None
            raise RemoteError(f"{url}: not found (no such bucket or key); check the URL") from None
        except PermissionError:
            raise RemoteError(f"{url}: access denied; credentials that may read it are needed (AWS_ACCESS_KEY_ID"
                              " and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
        except _s3_errors() as e:  # no connection, no credentials, a cut reply
            raise RemoteError(f"{url}: {_s3_reason(e)}") from None
        total = _total(content_range, url)
        want = min(end, total) - start
        if len(data) < want or (length is not None and len(data) != length):
            raise RemoteError(f"{url}: the response was cut short ({len(data)} of {want} bytes); try again")
        return data[:want], total

    return fetch


def _s3_errors() -> tuple[type[BaseException], ...]:
    """What botocore, aiohttp and s3fs raise for a request that failed."""
    import aiohttp
    import botocore.exceptions

    return OSError, aiohttp.ClientError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError


def _s3_reason(error: Exception) -> str:
    """One line for an error s3fs or botocore raised (their messages may span lines)."""
    name = type(error).__name__
    if "Connect" in name or isinstance(error, ConnectionError):
        return "cannot connect (check AWS_ENDPOINT_URL and the network)"
    if "Credentials" in name:
        return "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    if "InvalidRange" in str(error):
        return "the file is empty (0 bytes)"
    return f"cannot read it ({name}: {' '.join(str(error).split())[:200]})"


def _s3(url: str):
    """s3fs, which s3:// needs."""
    try:
        import s3fs
    except ImportError:
        raise InputError(f"{url}: s3:// URLs need s3fs: pip install 'paramsurgeon[s3]'") from None
    return s3fs


def _repo(remote: Remote, match: re.Match) -> "_HubRepo":
    key = (match["repo"], match["revision"])
    if key not in remote.repos:
        remote.repos[key] = _HubRepo(remote, *key)
    return remote.repos[key]


class _HubRepo:
    """A hub model repository at one revision: its commit, files and sizes, looked up once."""

    def __init__(self, remote: Remote, repo: str, revision: str | None):
        self.remote, self.repo, self.revision = remote, repo, revision
        self.url = f"hf://{repo}" + (f"@{revision}" if revision else "")
        self._files: dict[str, int] | None = None
        self._headers: dict | None = None
        self.commit = revision

    def headers(self) -> dict:
        if self._headers is None:
            token = _token()
            self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self._headers

    def endpoint(self) -> str:
        return (os.environ.get("HF_ENDPOINT") or _hub().constants.ENDPOINT).rstrip("/")

    def file_url(self, path: str) -> str:
        return f"{self.endpoint()}/{self.repo}/resolve/{self.commit}/{urllib.parse.quote(path)}"

    def size(self, path: str) -> int | None:
        return self.files().get(path.strip("/"))

    def is_dir(self, path: str) -> bool:
        folder = path.strip("/")
        return not folder or any(name.startswith(folder + "/") for name in self.files())

    def names(self, path: str) -> list[str]:
        folder = path.strip("/")
        inside = [n[len(folder) + 1:] if folder else n for n in self.files() if not folder or n.startswith(folder + "/")]
        return sorted({n.split("/")[0] for n in inside})

    def files(self) -> dict[str, int]:
        if self._files is None:
            self._files = self._look_up()
        return self._files

    def _look_up(self) -> dict[str, int]:
        """One request: the commit the revision names, and every file with its size."""
        import json

        revision = urllib.parse.quote(self.revision or "main", safe="")
        address = f"{self.endpoint()}/api/models/{self.repo}/revision/{revision}?blobs=true"
        with _answers(self.remote, self.url, "no such repository or revision (HTTP 404); check the name, or set HF_TOKEN"
                                " if it is private"):
            with _get(self.remote, address, self.headers()) as reply:
                answer = reply.read()
        try:
            info = json.loads(answer)
            self.commit = info["sha"]
            return {s["rfilename"]: int(s.get("size") or (s.get("lfs") or {}).get("size") or 0)
                    for s in info["siblings"]}
        except (ValueError, KeyError, TypeError) as e:
            raise RemoteError(f"{self.url}: the hub's answer about the repository is not understood ({e})") from None


def _token() -> str | None:
    """The hub token huggingface_hub's get_token finds (OIDC, HF_TOKEN, its token file, Colab's
    secrets); where none of those sources is there, None without importing its authentication
    (a tenth of a second of every hf:// command)."""
    hub = _hub()
    if not any(os.environ.get(name) for name in _TOKEN_VARIABLES) and "google.colab" not in sys.modules \
            and not os.path.exists(hub.constants.HF_TOKEN_PATH):
        return None
    return hub.get_token()


def _hub():
    """huggingface_hub, which hf:// needs (for the endpoint and the token)."""
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401
    except ImportError:
        raise InputError("hf:// URLs need huggingface_hub (for the hub's endpoint and token):"
                         " pip install 'paramsurgeon[hub]'") from None
    return huggingface_hub
