"""Storage access for every job: resolve URIs, whole-file atomic writes and exclusive creates,
JSON reads, bounded object reads, failure classification and retries.

Everything goes through fsspec, so ``s3://``, ``gs://``, ``memory://`` and local paths
work alike. (Listing the batch job's inputs is the job's own: ``jobs/infer/plan/sources.py``.)

S3 configuration is the standard AWS environment: botocore's credential chain, region,
and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores. botocore
>= 1.31 reads the endpoint variables itself (verified with s3fs 2026.9 / botocore 1.43
against moto), but :func:`resolve` also passes the endpoint to s3fs explicitly: older
botocore in our supported range ignores them, and fsspec caches filesystem instances by
constructor arguments, so an endpoint that lives only in the environment could be
served by a stale cached instance.

Failures are classified (:func:`classify_storage_error`) into the output's storage error
kinds: ``unavailable`` (throttling, 5xx, timeouts, connection errors, expired credentials:
worth retrying), ``access`` (denied), ``not_found`` and ``read`` (anything else). Reads,
stats and listing pages retry ``unavailable`` failures with exponential backoff and full
jitter (:class:`RetryPolicy`), on top of botocore's own retries (``AWS_RETRY_MODE``,
``AWS_MAX_ATTEMPTS``) and s3fs's (SlowDown only).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

DEFAULT_MAX_BYTES = 256 * 2**20  # a single image file larger than this is an error row


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


def join(path: str, *parts: str) -> str:
    return posixpath.join(path.rstrip("/"), *parts)


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
