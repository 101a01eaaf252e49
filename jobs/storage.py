"""Storage access for every job: resolve URIs, whole-file atomic writes and exclusive creates,
JSON reads, streamed listings, bounded object reads, failure classification and retries.

Everything goes through fsspec, so ``s3://``, ``gs://``, ``memory://`` and local paths
work alike. Listings are generators of :class:`SourceObject` (image_uri, source_etag, source_size) that yield
as the store answers; nothing here builds the whole listing as a list:

* S3: one ``ListObjectsV2`` page (1000 keys) at a time through s3fs's client, so a
  prefix of a million keys costs one page of memory and the first key arrives after the
  first request. (s3fs's own ``find``/``ls`` collect every page before returning.)
* local paths: ``os.scandir`` recursion, yielding entries as the directory is read.
* other fsspec filesystems: ``fs.walk``, which holds one directory level at a time.

S3 configuration is the standard AWS environment: botocore's credential chain, region,
and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores. botocore
>= 1.31 reads the endpoint variables itself (verified with s3fs 2026.9 / botocore 1.43
against moto), but :func:`resolve` also passes the endpoint to s3fs explicitly: older
botocore in our supported range ignores them, and fsspec caches filesystem instances by
constructor arguments, so an endpoint that lives only in the environment could be
served by a stale cached instance.

Change tokens (``etag``) are opaque strings compared together with the size:

* S3/GCS/Azure: the store's ETag, surrounding quotes and a weak ``W/`` prefix removed.
  Multipart ETags (``...-N``) are not content MD5s; that is fine for change detection.
* local files: ``"<st_mtime_ns>-<st_size>"``. A content hash would mean reading every
  byte of the archive on the driver while listing, before any work starts, and again in
  the worker; mtime+size is what make/rsync use and changes whenever a file is rewritten
  or replaced. It misses only a content change that keeps both size and mtime (e.g.
  ``cp -p`` of a different file of the same size), which we accept.

Failures are classified (:func:`classify_storage_error`) into the output's storage error
kinds: ``unavailable`` (throttling, 5xx, timeouts, connection errors, expired credentials:
worth retrying), ``access`` (denied), ``not_found`` and ``read`` (anything else). Reads,
stats and listing pages retry ``unavailable`` failures with exponential backoff and full
jitter (:class:`RetryPolicy`), on top of botocore's own retries (``AWS_RETRY_MODE``,
``AWS_MAX_ATTEMPTS``) and s3fs's (SlowDown only).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import io
import json
import os
import posixpath
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import fsspec
from fsspec.compression import compr
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

# what decode.py accepts (HEIC/HEIF with pillow-heif, AVIF with Pillow's libavif)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".avif", ".heic",
                              ".heif"})
LIST_FILE_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
COMPRESSION_EXTENSIONS = frozenset({".gz", ".bz2", ".xz", ".zst"})
DEFAULT_MAX_BYTES = 256 * 2**20  # a single image file larger than this is an error row


@dataclass(frozen=True, slots=True)
class SourceObject:
    """One input: canonical URI, change token and size (None when unknown), under the names of
    the output's columns for them (the plan files and the result rows use the same).

    ``error`` is set when the object could not even be stat'ed (e.g. a list-file entry
    that does not exist), with its error kind in ``error_kind``; the job turns such items
    into error rows (or, for a storage kind, tries to read them anyway).
    """

    image_uri: str
    source_etag: str | None
    source_size: int | None
    error: str | None = None
    error_kind: str | None = None


class ReadError(Exception):
    """An input object could not be read; ``reason`` is one line, ``kind`` the output's error
    kind (``unavailable``, ``access``, ``read``, ``not_found`` or ``limit``)."""

    def __init__(self, reason: str, kind: str = "read"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


# ------------------------------------------------------------------ failures and retries

# Error codes that mean "try again later": S3's throttling and 5xx codes, the throttling and
# transient codes botocore's standard retry mode uses, and expired temporary credentials
# (botocore refreshes refreshable credentials on the next call).
_UNAVAILABLE_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "OperationAborted", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException",
    "ProvisionedThroughputExceededException", "TransactionInProgressException", "EC2ThrottledException",
    "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired",
})
_UNAVAILABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_ACCESS_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                           "InvalidToken", "AccountProblem", "InvalidObjectState"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound"})
_UNAVAILABLE_ERRNOS = frozenset({
    errno.EBUSY,  # s3fs's translation of SlowDown / 503
    getattr(errno, "EREMOTEIO", -1),  # s3fs's translation of 500 InternalError
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN,
})
# Exception class names (of botocore, aiohttp, urllib3, fsspec) that are connection or timeout
# failures; matched by name so that none of those packages has to be importable here.
_UNAVAILABLE_TYPES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "HTTPClientError", "IncompleteReadError", "ResponseStreamingError",
    "CredentialRetrievalError", "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
    "ClientPayloadError", "ClientOSError", "ServerTimeoutError", "ProtocolError", "FSTimeoutError",
})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _kind_from_response(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in _UNAVAILABLE_CODES or status in _UNAVAILABLE_STATUS:
        return "unavailable"
    if code in _ACCESS_CODES or status == 403:
        return "access"
    if code in _NOT_FOUND_CODES or status == 404:
        return "not_found"
    return None


def _kind_from_type(e: BaseException) -> str | None:
    if isinstance(e, FileNotFoundError):
        return "not_found"
    if isinstance(e, PermissionError):
        return "access"
    if isinstance(e, (ConnectionError, TimeoutError)):  # incl. socket.timeout, asyncio.TimeoutError
        return "unavailable"
    if any(c.__name__ in _UNAVAILABLE_TYPES for c in type(e).__mro__):
        return "unavailable"
    if isinstance(e, OSError) and e.errno in _UNAVAILABLE_ERRNOS:
        return "unavailable"
    return None


def classify_storage_error(exc: BaseException) -> str:
    """The error kind of a failed storage call: ``unavailable``, ``access``, ``not_found`` or ``read``.

    The store's own answer (a botocore ClientError's code and HTTP status, anywhere in the
    exception's cause chain: s3fs re-raises it as an OSError) decides first; then the
    exception types of the chain; anything unrecognised is ``read``.
    """
    for e in _chain(exc):
        kind = _kind_from_response(e)
        if kind:
            return kind
    for e in _chain(exc):
        kind = _kind_from_type(e)
        if kind:
            return kind
    return "read"


@dataclass(frozen=True)
class RetryPolicy:
    """How a storage call that failed as ``unavailable`` is retried: ``attempts`` tries in all,
    sleeping a random time in ``[0, min(cap_s, base_s * 2**i)]`` before try ``i + 2``
    (exponential backoff with full jitter, as AWS's guidance on retries describes)."""

    attempts: int = 6
    base_s: float = 1.0
    cap_s: float = 30.0

    def __post_init__(self):
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"invalid retry policy {self}: attempts >= 1, base_s >= 0, cap_s >= 0")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0.0, min(self.cap_s, self.base_s * 2.0 ** retry))


NO_RETRIES = RetryPolicy(attempts=1)
T = TypeVar("T")


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried while it fails as ``unavailable`` and ``policy`` allows; the last
    failure is raised with ``retry_attempts`` (tries made) set on it."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == policy.attempts or classify_storage_error(e) != "unavailable":
                e.retry_attempts = attempt
                raise
            sleep(policy.delay(attempt - 1))
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ resolving

def _is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` taken from the standard environment."""
    if _is_s3(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"endpoint_url": endpoint}
    return {}


def resolve(uri: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URI or local path, honouring AWS_ENDPOINT_URL for S3; ``options``
    (fsspec's, e.g. credentials) add to or override the environment's."""
    if not uri:
        raise ValueError("empty URI")
    fs, path = fsspec.core.url_to_fs(uri, **{**storage_options(uri), **(options or {})})
    return fs, path


def canonical_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The one spelling of an object's URI used in rows and state (``s3://b/k``, ``file:///p``)."""
    return fs.unstrip_protocol(path)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path.rstrip("/"), *parts)


# ------------------------------------------------------------------ metadata

def normalize_etag(value: Any) -> str | None:
    """An opaque change token as stored in the output: no quotes, no weak prefix."""
    if value is None:
        return None
    s = str(value).strip()
    if s.startswith("W/"):
        s = s[2:]
    s = s.strip('"')
    return s or None


def local_etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}-{st.st_size}"


def _etag_from_info(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(key):
            return normalize_etag(info[key])
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return f"mtime-{info[key]}-{info.get('size')}"
    return None


def _source_from_info(fs, path: str, info: dict[str, Any]) -> SourceObject:
    if isinstance(fs, LocalFileSystem):
        st = os.stat(path)
        return SourceObject(canonical_uri(fs, path), local_etag(st), st.st_size)
    size = info.get("size")
    return SourceObject(canonical_uri(fs, path), _etag_from_info(info), None if size is None else int(size))


def has_extension(uri: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> bool:
    return posixpath.splitext(uri.rsplit("?", 1)[0])[1].lower() in extensions


# ------------------------------------------------------------------ listing

def _walk_local(root: str) -> Iterator[SourceObject]:
    fs = LocalFileSystem()
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            subdirs = []
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                elif entry.is_file():
                    st = entry.stat()
                    yield SourceObject(canonical_uri(fs, entry.path), local_etag(st), st.st_size)
            # Reversed so the pop order visits subdirectories in scandir order.
            stack.extend(reversed(subdirs))


def walk_s3(fs, path: str, page_size: int, retry: RetryPolicy) -> Iterator[SourceObject]:
    """Every object under the S3 prefix ``path`` (``bucket/key``), one ListObjectsV2 page at a time."""
    bucket, _, key = path.partition("/")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    while True:
        page = call_with_retries(lambda: fs.call_s3("list_objects_v2", **kwargs), retry)
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):  # "directory" marker objects
                continue
            yield SourceObject(
                f"s3://{bucket}/{obj['Key']}", normalize_etag(obj.get("ETag")), int(obj["Size"])
            )
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _walk_generic(fs, path: str) -> Iterator[SourceObject]:
    for _root, _dirs, files in fs.walk(path, detail=True):
        for name in sorted(files):
            info = files[name]
            if info.get("type", "file") == "file":
                yield _source_from_info(fs, info["name"], info)


def list_prefix(uri: str, *, page_size: int = 1000, retry: RetryPolicy = RetryPolicy()) -> Iterator[SourceObject]:
    """Every object under ``uri`` (a directory / key prefix), streamed as listed.

    Raises FileNotFoundError when a local directory does not exist; an empty or missing
    S3 prefix simply yields nothing. S3 listing pages are retried as ``retry`` says.
    """
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"input directory not found: {uri}")
        yield from _walk_local(path)
    elif "s3" in fs.protocol and hasattr(fs, "call_s3"):
        yield from walk_s3(fs, path, page_size, retry)
    else:
        yield from _walk_generic(fs, path)


def iter_list_file(uri: str) -> Iterator[str]:
    """The URIs in a list file, one per line, streamed; blank lines and ``#`` comments skipped.

    Compressed list files (.gz, .bz2, .xz, .zst) are decompressed on the fly.
    """
    fs, path = resolve(uri)
    codec = infer_compression(path)
    with fs.open(path, "rb") as raw:
        stream = compr[codec](raw, mode="rb") if codec else raw
        with io.TextIOWrapper(stream, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line


def _stat_one(uri: str, retry: RetryPolicy) -> SourceObject:
    try:
        fs, path = resolve(uri)
        if isinstance(fs, LocalFileSystem):
            st = os.stat(path)
            if not os.path.isfile(path):
                return SourceObject(canonical_uri(fs, path), None, None, f"not a file: {uri}", "not_found")
            return SourceObject(canonical_uri(fs, path), local_etag(st), st.st_size)
        info = call_with_retries(lambda: fs.info(path), retry)
        if info.get("type") != "file":
            return SourceObject(canonical_uri(fs, path), None, None, f"not a file: {uri}", "not_found")
        return _source_from_info(fs, path, info)
    except FileNotFoundError:
        return SourceObject(_canonical_or_raw(uri), None, None, f"source not found: {uri}", "not_found")
    except Exception as e:  # noqa: BLE001  (one bad line must not stop the run)
        return SourceObject(_canonical_or_raw(uri), None, None, f"cannot stat source: {describe_error(e)}",
                            classify_storage_error(e))


def _canonical_or_raw(uri: str) -> str:
    try:
        fs, path = resolve(uri)
        return canonical_uri(fs, path)
    except Exception:  # noqa: BLE001
        return uri


def stat_uris(uris: Iterable[str], *, concurrency: int = 16, retry: RetryPolicy = RetryPolicy()) -> Iterator[SourceObject]:
    """SourceObjects for ``uris`` in input order, ``concurrency`` stats in flight at once.

    A sliding window keeps memory bounded: a list of a million URIs is never held whole.
    Objects that cannot be stat'ed come back with ``error`` set instead of raising.
    """
    it = iter(uris)
    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        window: deque[cf.Future] = deque()
        for uri in it:
            window.append(pool.submit(_stat_one, uri, retry))
            if len(window) >= 2 * concurrency:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def is_list_file(uri: str) -> bool:
    stem = uri
    if posixpath.splitext(stem)[1].lower() in COMPRESSION_EXTENSIONS:
        stem = posixpath.splitext(stem)[0]
    return has_extension(stem, LIST_FILE_EXTENSIONS)


# ------------------------------------------------------------------ whole-file writes and reads

def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def _local_temp(path: str, data: bytes) -> str:
    """A durable (fsynced) temporary file beside ``path``, to be renamed or linked into place."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``path`` so that readers see the old content or all of the new, never a part."""
    if is_local(fs):
        os.replace(_local_temp(path, data), path)
    else:
        # One PUT (or a multipart upload completed at the end): atomic on object stores.
        fs.pipe_file(path, data)


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; False if it already did."""
    if is_local(fs):
        tmp = _local_temp(path, data)
        try:
            os.link(tmp, path)  # atomic and exclusive: fails if path exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        # s3fs sends If-None-Match: * (honoured by AWS S3 and moto).
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):
        # Filesystems without exclusive create: check, then write (not race-free).
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def read_json(fs, path: str) -> Any:
    """JSON of a file that another process may be replacing: one whole-object GET, never a mix of
    two versions (``fs.open`` on S3 sends a HEAD then ranged GETs, which fail or tear in between)."""
    return json.loads(fs.cat_file(path))


# ------------------------------------------------------------------ reading

def describe_error(e: BaseException) -> str:
    """``"Type: message"`` on one line, as error rows and the job's messages give failures."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def read_object(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES, retry: RetryPolicy = RetryPolicy()) -> bytes:
    """The bytes of one input object, or ReadError with a one-line reason and error kind.

    At most ``max_bytes + 1`` bytes are fetched (one ranged GET on object stores), so a
    multi-gigabyte file named ``.jpg`` cannot exhaust a worker's memory. Failures that
    :func:`classify_storage_error` calls ``unavailable`` are retried as ``retry`` says.
    """

    def fetch(fs, path) -> bytes:
        try:
            return fs.cat_file(path, start=0, end=max_bytes + 1)
        except FileNotFoundError:
            raise
        except OSError:
            # S3 answers a ranged GET of a zero-byte object with 416 (range not satisfiable).
            if fs.info(path).get("size") == 0:
                return b""
            raise

    try:
        fs, path = resolve(uri)
        data = call_with_retries(lambda: fetch(fs, path), retry)
    except Exception as e:  # noqa: BLE001
        kind = classify_storage_error(e)
        if kind == "not_found":
            raise ReadError(f"source not found: {uri}", kind) from None
        tries = getattr(e, "retry_attempts", 1)
        after = f" after {tries} attempts" if tries > 1 else ""
        raise ReadError(f"read failed{after}: {describe_error(e)}", kind) from e
    if len(data) > max_bytes:
        raise ReadError(f"file too large: more than {max_bytes} bytes", "limit")
    return data
