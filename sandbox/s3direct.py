"""Single-request PUTs and presigned URLs signed by botocore's SigV4 signer, sent on urllib3.

Every job stores a few small objects (logs, events, its audit trail) and presigns each one. boto3
spends about 1.2 ms of CPU per PutObject and 0.19 ms per presign on its per-call machinery (event
hooks, the service model, serializers, parsers, its retry handler), which is most of a small PUT:
issue 10's trivial job is bound by the one worker process's CPU. Here the same signer classes
(`S3SigV4Auth`, `S3SigV4QueryAuth`), credentials, region and path-style URLs produce the same
request, and urllib3 (the pool under botocore) sends it. Multipart, get, list, delete and bucket
calls stay on boto3. Errors come back as botocore would raise them (a ClientError carrying the
status and the S3 error code, or the urllib3 transport error), so ArtifactStore translates both
paths with the same code.
"""
from __future__ import annotations

import http.client
import os
import socket
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.httpsession import ProxyConfiguration, get_cert_path
from botocore.retries.quota import RetryQuota
from botocore.utils import get_environ_proxies

REGION = "auto"             # R2's only region; SigV4 signs it into every credential scope
POOL_CONNECTIONS = 10       # botocore's max_pool_connections default; callers pass their thread count


class DirectS3:
    """PUTs of a body already in memory and presigned GET/PUT URLs, for one endpoint and key pair."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, timeout_s: float,
                 pool_connections: int = POOL_CONNECTIONS) -> None:
        self._origin = endpoint.rstrip("/")
        self._credentials = Credentials(access_key, secret_key)
        self._signer = S3SigV4Auth(self._credentials, "s3", REGION)
        self._http = _pool_manager(endpoint, timeout_s, pool_connections)
        self.retry_quota = RetryQuota()  # the callers' retries of these PUTs, as a boto3 client has one

    def url(self, bucket: str, key: str) -> str:
        """The path-style object URL, the key percent-encoded as botocore encodes it (`/` and `~` kept)."""
        return f"{self._origin}/{quote(bucket, safe='')}/{quote(key, safe='/~')}"

    def put(self, bucket: str, key: str, body: bytes, sse: dict[str, str]) -> None:
        """One signed PutObject; raises ClientError for a refusal, urllib3's errors for the transport.

        The payload is signed (x-amz-content-sha256 = the body's SHA-256), as botocore does for a
        body without Content-MD5: the store checks the bytes it got against the signature, and
        hashing a log of a few KiB costs microseconds. No `Expect: 100-continue`: the body goes
        right after the headers (a round trip less per small object)."""
        url = self.url(bucket, key)
        request = AWSRequest("PUT", url, data=body, headers=dict(sse))
        self._signer.add_auth(request)
        # urllib3 re-parses url and drops ./.. segments (botocore signed them as sent); the two stay
        # identical only because check_key refuses such keys before anything is signed
        response = self._http.urlopen("PUT", url, body=body, headers=dict(request.headers.items()),
                                      retries=False, redirect=False, preload_content=True)
        if not 200 <= response.status < 300:
            raise _client_error(response, "PutObject")

    def presign(self, method: str, bucket: str, key: str, ttl_s: int, sse: dict[str, str]) -> str:
        """A presigned URL for GET or PUT on key. With SSE-C the key headers are signed into it, so
        whoever uses the URL must send them too (the URL alone does not decrypt)."""
        request = AWSRequest(method, self.url(bucket, key), headers=dict(sse))
        S3SigV4QueryAuth(self._credentials, "s3", REGION, expires=ttl_s).add_auth(request)
        return str(request.url)


def _pool_manager(endpoint: str, timeout_s: float, pool_connections: int = POOL_CONNECTIONS) -> urllib3.PoolManager:
    """A pool with botocore's settings: its timeouts, keep-alive, CA bundle and environment proxy.

    pool_connections is the number of threads that may PUT at once: each holds at most one
    connection, so none is ever opened only to be thrown away (urllib3 warns "Connection pool is
    full, discarding connection"), and non-blocking means no thread ever waits for a socket."""
    options: dict[str, Any] = {
        "maxsize": pool_connections, "block": False, "retries": False,
        "timeout": urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s),
        "socket_options": [*urllib3.connection.HTTPConnection.default_socket_options,
                           (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)],
    }
    scheme = urlsplit(endpoint).scheme
    if scheme == "https":
        # what boto3 verifies against: AWS_CA_BUNDLE if set, else botocore's bundle (certifi's)
        options.update(cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))
    # as URLLib3Session reads HTTP(S)_PROXY/NO_PROXY: a proxy without a scheme gets http://, and a
    # proxy's user:password becomes a Proxy-Authorization header (urllib3 ignores userinfo: 407)
    proxies = ProxyConfiguration(proxies=get_environ_proxies(endpoint))
    proxy = proxies.proxy_url_for(endpoint)
    if proxy:
        return urllib3.ProxyManager(proxy, proxy_headers=proxies.proxy_headers_for(proxy), **options)
    return urllib3.PoolManager(**options)


def _client_error(response: Any, operation: str) -> ClientError:
    """The ClientError botocore would raise: the S3 error body's Code and Message, else the status."""
    code, message = str(response.status), http.client.responses.get(response.status, "")
    try:
        root = ET.fromstring(response.data) if response.data else None
    except ET.ParseError:
        root = None
    if root is not None and _tag(root) == "Error":
        fields = {_tag(child): (child.text or "") for child in root}
        code, message = fields.get("Code") or code, fields.get("Message", message)
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": response.status}}, operation)


def _tag(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]  # S3 errors carry no namespace; some S3 servers add one
