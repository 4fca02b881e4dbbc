"""Where data lives: expanding shard / table patterns and reading bytes from local files, object storage,
HTTP and ``pipe:`` commands.

A pattern is one or more ``::``-separated parts; each part has its braces expanded (``{00000..00009}``, as
webdataset does) and then is, per result:

  * a local file, a local glob (``out/*.parquet``) or a local folder (every file under it with one of the
    wanted suffixes, recursively, sorted: img2dataset's ``out/`` beside its ``*_stats.json``, an HF repo's
    ``data/``);
  * a remote URL read through :mod:`fsspec` (``s3://``, ``gs://``, ``https://``, ``hf://``, any protocol
    fsspec knows; a glob or a folder is listed on the remote filesystem). Credentials and endpoints come
    from the usual environment of each filesystem (``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` and
    ``~/.aws/credentials`` for s3, ``GOOGLE_APPLICATION_CREDENTIALS`` for gs, ``HF_TOKEN`` for hf), never
    from the pattern or the cache;
  * a ``pipe:COMMAND`` whose standard output is the shard (webdataset's ``gopen``). A command is only ever
    run from a pattern the user typed: a cache records it but never runs it (:func:`has_pipe`).

:class:`ByteReader` reads ``(offset, size)`` byte ranges (``os.pread`` locally, one HTTP ``Range`` request
remotely, a forward-only stream for ``pipe:``) and opens whole streams (the index pass). A server that answers
a range with the whole object (``python -m http.server``) stops the run naming the fix
(:class:`RangeNotHonouredError`): its bytes would otherwise be taken for the sample's, every image "corrupt"
and every tar "truncated". A transient failure (connection refused or reset, time-out, HTTP 429 / 5xx) is tried
again, then raises :class:`SourceUnavailableError`, which stops a run instead of skipping samples.
:func:`public_url` is what a cache records: user names, passwords and signing parameters removed.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import braceexpand

logger = logging.getLogger(__name__)
T = TypeVar("T")

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB = re.compile(r"[*?\[]")
# query parameters and command-line words that carry secrets (presigned URLs, tokens, curl headers)
_SECRET_PARAM = re.compile(r"(?i)(signature|token|secret|password|credential|sig|key|auth)")
_SECRET_WORD = re.compile(
    r"(?i)((?:authorization|x-amz-security-token|cookie)\s*:\s*)[^'\"]+|"
    r"((?:token|secret|password|passwd|signature|access[_-]?key)[a-z_-]*\s*[=:]\s*)[^\s'\"&]+"
)


# a remote read that fails transiently (connection refused or reset, time-out, HTTP 429 / 5xx) is tried again,
# waiting RETRY_WAIT_S, then twice as long each time; after REMOTE_TRIES tries the run stops (resumable)
REMOTE_TRIES = 4
RETRY_WAIT_S = 0.5


class SourceUnavailableError(OSError):
    """The data source kept failing transiently (connection refused or reset, time-out, HTTP 429 / 5xx) after
    :data:`REMOTE_TRIES` tries. It stops the run instead of recording good samples as unreadable: a stage 1
    started again with the same command continues where it stopped."""


def retry_remote(url: str, call: Callable[[], T]) -> T:
    """``call()``, a read of the remote ``url``, tried again on a transient failure (:func:`is_transient`;
    ``REMOTE_TRIES`` tries, waits doubling from ``RETRY_WAIT_S``); :class:`SourceUnavailableError` when it
    keeps failing. Any other error is raised as it is (the caller's: a bad sample, a bad file)."""
    for attempt in range(REMOTE_TRIES):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - classified below; anything else is re-raised as it is
            if not is_transient(e):
                raise
            if attempt == REMOTE_TRIES - 1:
                raise SourceUnavailableError(
                    f"{public_url(url)}: {type(e).__name__}: {e} ({REMOTE_TRIES} tries over "
                    f"{RETRY_WAIT_S * (2 ** (REMOTE_TRIES - 1) - 1):.1f} s); the source is unavailable, so the run "
                    "stops rather than record good samples as unreadable: run the same command again once it "
                    "answers (stage 1 resumes where it stopped)"
                ) from e
            wait = RETRY_WAIT_S * 2**attempt
            logger.warning("%s: %s: %s; trying again in %.1f s", public_url(url), type(e).__name__, e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def is_transient(err: BaseException) -> bool:
    """True for failures of the network or the server rather than of the data: connection errors, time-outs,
    HTTP 429 and 5xx (aiohttp's and botocore's statuses, builtin ``ConnectionError`` / ``TimeoutError``),
    also as the cause of another error (fsspec's HTTP file raises ``FileNotFoundError`` from a 503 while it
    asks for the file's size)."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    cause = err.__cause__
    if cause is not None and cause is not err and is_transient(cause):
        return True
    status = getattr(err, "status", None)
    response = getattr(err, "response", None)
    if status is None and isinstance(
        response, dict
    ):  # botocore: response["ResponseMetadata"]["HTTPStatusCode"]
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(status, int) and (status == 429 or 500 <= status < 600):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp is a dependency (fsspec's HTTP filesystem)
        return False
    return isinstance(err, aiohttp.ClientConnectionError | aiohttp.ServerTimeoutError)


def is_pipe(url: str) -> bool:
    return str(url).startswith("pipe:")


def is_remote(url: str) -> bool:
    """True for URLs other than ``file://`` and for ``pipe:`` commands."""
    u = str(url)
    return is_pipe(u) or (bool(_URL.match(u)) and not u.startswith("file://"))


def has_pipe(pattern: str | list[str]) -> bool:
    """True when any part of a pattern is a ``pipe:`` command."""
    parts = [pattern] if isinstance(pattern, str) else list(pattern)
    return any(is_pipe(q) for p in parts for q in str(p).split("::"))


def _parts(pattern: str | list[str]) -> list[str]:
    items = [pattern] if isinstance(pattern, str) else [str(p) for p in pattern]
    out: list[str] = []
    for item in items:
        if is_pipe(
            item
        ):  # a command is one part (its text may hold '::'); braces expanded as webdataset does
            out += list(braceexpand.braceexpand(item))
            continue
        for part in str(item).split("::"):
            out += list(braceexpand.braceexpand(part)) if part else []
    return out


def _strip_file(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def expand_pattern(pattern: str | list[str], suffixes: tuple[str, ...], what: str = "shard") -> list[str]:
    """Every file a pattern names (see the module docstring), in order: parts as given, globs and folders
    sorted. Local files must exist; remote files named one by one are checked when they are read (one
    request per file would slow a start over thousands of shards). ``suffixes`` (``(".tar",)``) filter the
    files of a folder; ``what`` names them in errors."""
    out: list[str] = []
    for p in _parts(pattern):
        if is_pipe(p):
            out.append(p)
        elif is_remote(p):
            out += _expand_remote(p, suffixes, what)
        else:
            p = _strip_file(p)
            if _GLOB.search(p):
                found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
                if not found:
                    raise ValueError(f"no {what} matches {p!r}")
                out += found
            elif os.path.isdir(p):
                found = sorted(
                    str(f) for f in Path(p).rglob("*") if f.is_file() and f.name.lower().endswith(suffixes)
                )
                if not found:
                    raise ValueError(
                        f"the folder {p} holds no {what} ({'/'.join(suffixes)} file, searched recursively); "
                        "give a pattern such as DIR/{00000..00009}" + suffixes[0]
                    )
                out += found
            else:
                out.append(p)
    missing = [p for p in out if not is_remote(p) and not os.path.isfile(p)]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(out)} {what}(s) of {pattern!r} do not exist (first: {missing[:3]}); check the "
            "pattern (braces like {00000..00009} are expanded, globs and folders are listed)"
        )
    if not out:
        raise ValueError(f"the pattern {pattern!r} names no {what}")
    return out


def _expand_remote(url: str, suffixes: tuple[str, ...], what: str) -> list[str]:
    fs, path = filesystem(url)
    if _GLOB.search(path):
        found = sorted(retry_remote(url, lambda: fs.glob(path)))
    elif url.endswith("/"):
        found = sorted(f for f in retry_remote(url, lambda: fs.find(path)) if f.lower().endswith(suffixes))
    else:
        return [url]
    found = [fs.unstrip_protocol(f) for f in found]
    if not found:
        raise ValueError(f"no {what} matches {public_url(url)!r} (listed on {type(fs).__name__})")
    return found


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` of a remote URL; a missing driver (s3fs, gcsfs) is named with its install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        proto = url.split("://", 1)[0]
        pkg = {"s3": "s3fs (pip install 'tipsdistill[s3]')", "gs": "gcsfs", "gcs": "gcsfs"}.get(proto, str(e))
        raise ValueError(f"reading {public_url(url)!r} needs {pkg}: {e}") from e


def public_url(url: str) -> str:
    """``url`` without secrets: no user name or password, no signing / token query parameters; in a ``pipe:``
    command, values after ``Authorization:``, ``token=``, ``secret=``, ... replaced by ``***``."""
    u = str(url)
    if is_pipe(u):
        return _SECRET_WORD.sub(lambda m: (m.group(1) or m.group(2)) + "***", u)
    if not _URL.match(u):
        return u
    s = urllib.parse.urlsplit(u)
    netloc = s.hostname or ""
    if s.port:
        netloc += f":{s.port}"
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, v in urllib.parse.parse_qsl(s.query, keep_blank_values=True)
            if not _SECRET_PARAM.search(k)
        ]
    )
    return urllib.parse.urlunsplit((s.scheme, netloc, s.path, query, s.fragment))


def redact(obj: Any) -> Any:
    """A JSON-like structure with every string that holds a URL or ``pipe:`` command passed through
    :func:`public_url` (in a ``wds:``/``parquet:`` spec too): what a cache may record."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        scheme, sep, rest = obj.partition(":")
        if (
            sep and scheme.isalpha() and is_remote(rest) and not is_remote(obj)
        ):  # wds:https://..., tsv:pipe:...
            return f"{scheme}:{public_pattern(rest)}"
        return public_pattern(obj) if is_remote(obj) else obj
    return obj


def public_pattern(pattern: str | list[str]) -> str | list[str]:
    """:func:`public_url` of each ``::``-part of a pattern, local parts made absolute (braces, globs kept)."""

    def one(part: str) -> str:
        return public_url(part) if is_remote(part) else os.path.abspath(_strip_file(part))

    if isinstance(pattern, str):
        return public_url(pattern) if is_pipe(pattern) else "::".join(one(u) for u in pattern.split("::"))
    return [one(u) for u in pattern]


class RangeNotHonouredError(ValueError):
    """A server answered a byte-range request with the whole object: no sample can be read by offset from it.
    Met while indexing (the end-of-tar check reads a range) it stops the run with its fix; met by a sample
    read, that sample is skipped with this message."""


class _PipeStream:
    """A forward-only reader of a ``pipe:`` command's output, with its position."""

    def __init__(self, url: str) -> None:
        from webdataset.gopen import gopen

        self.stream = gopen(url, "rb")
        self.pos = 0

    def read_at(self, offset: int, size: int) -> bytes:
        skip = offset - self.pos
        while skip > 0:
            chunk = self.stream.read(min(skip, 1 << 20))
            if not chunk:
                break
            skip -= len(chunk)
            self.pos += len(chunk)
        data = self.stream.read(size)
        self.pos += len(data)
        return data

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception as e:  # noqa: BLE001 - a command that exits non-zero after we stopped reading
            logger.debug("closing a pipe: %s", e)


class ByteReader:
    """Byte ranges of local files, remote objects and ``pipe:`` streams, for one process.

    Local files stay open (at most ``max_open`` descriptors, oldest closed first); remote filesystems are
    made on first use; a ``pipe:`` stream is kept and read forward (a read behind its position runs the
    command again, logged: random access to a ``pipe:`` shard costs a stream up to the offset). Nothing is
    shared across processes: after a fork or in a DataLoader worker (pickled) it starts empty.
    """

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._fds: dict[str, int] = {}
        self._fs: dict[str, tuple[Any, str]] = {}
        self._pipes: dict[str, _PipeStream] = {}
        self._sizes: dict[str, int] = {}  # remote sizes asked once (each costs a round trip: HEAD)
        self._pid = os.getpid()
        self.opens = 0  # files / streams opened by this process (benchmarks count them)
        self.requests = 0  # reads issued

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_open"])  # type: ignore[misc]

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: never share descriptors or sockets with the parent
            self._fds, self._fs, self._pipes, self._pid = {}, {}, {}, os.getpid()

    def read(self, url: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (fewer at the end of the data)."""
        self._check_pid()
        self.requests += 1
        if is_pipe(url):
            s = self._pipes.get(url)
            if s is None or s.pos > offset:
                if s is not None:
                    logger.info(
                        "pipe: read behind the stream's position, running the command again: %s",
                        public_url(url),
                    )
                    s.close()
                s = self._pipes[url] = _PipeStream(url)
                self.opens += 1
            return s.read_at(offset, size)
        if is_remote(url):
            data = self._retrying(url, lambda fs, path: fs.cat_file(path, start=offset, end=offset + size))
            if len(data) > size:  # the whole object: the server ignored the Range header
                raise RangeNotHonouredError(
                    f"{public_url(url)}: the server ignored the byte range asked (bytes {offset}-{offset + size - 1}) "
                    f"and sent {len(data)} bytes; reading samples by offset needs a server that honours HTTP Range "
                    "requests (nginx, Apache, caddy, S3/GCS and their gateways do; `python -m http.server` does not). "
                    "Serve the shards with one of these, or copy them to a local folder"
                )
            return data
        return os.pread(self._fd(url), size, offset)

    def _retrying(self, url: str, call: Any) -> Any:
        """``call(fs, path)`` on a remote URL through :func:`retry_remote`."""
        fs, path = self._remote(url)
        return retry_remote(url, lambda: call(fs, path))

    def _remote(self, url: str) -> tuple[Any, str]:
        hit = self._fs.get(url)
        if hit is None:
            hit = self._fs[url] = filesystem(url)
            self.opens += 1
        return hit

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= self.max_open:  # stay far below the open-file limit
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[path] = os.open(_strip_file(path), os.O_RDONLY)
            self.opens += 1
        return fd

    def size(self, url: str) -> int | None:
        """The size in bytes, ``None`` for a ``pipe:`` stream."""
        if is_pipe(url):
            return None
        if is_remote(url):
            if url not in self._sizes:
                self._sizes[url] = int(self._retrying(url, lambda fs, path: fs.size(path)))
            return self._sizes[url]
        return os.stat(_strip_file(url)).st_size

    def open(self, url: str) -> IO[bytes]:
        """The whole object as a sequential stream (the index pass); seekable except for ``pipe:``."""
        self._check_pid()
        self.opens += 1
        if is_pipe(url):
            from webdataset.gopen import gopen

            return gopen(url, "rb")
        if is_remote(url):
            fs, path = self._remote(url)
            return fs.open(path, "rb", block_size=8 << 20)
        return open(_strip_file(url), "rb")

    def close(self) -> None:
        """Close what this process opened (reopened on the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
            for s in self._pipes.values():
                s.close()
        self._fds, self._pipes = {}, {}
