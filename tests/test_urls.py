"""bot/urls.py: the address guard and the bounded fetcher.

The guard's verdicts are checked on addresses directly; the fetcher against an HTTP server on
127.0.0.1 — reachable only where a test passes `allow_loopback_for_tests=True`, and refused
(before any connection: the server counts requests) everywhere else.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver

from bot.urls import (
    MAX_REDIRECTS,
    AddressNotAllowed,
    AddressPolicy,
    ImageFetcher,
    ImageFetchError,
    PublicAddressResolver,
    is_public_address,
)
from config import Settings
from tests.httpserver import LocalHTTPServer

NOT_PUBLIC = [
    "127.0.0.1",  # loopback
    "127.8.9.10",
    "10.1.2.3",  # RFC 1918
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # link-local: cloud metadata
    "169.254.10.1",
    "100.64.0.1",  # CGNAT
    "100.100.100.200",  # Alibaba Cloud metadata (in CGNAT)
    "0.0.0.0",
    "224.0.1.1",  # multicast (ipaddress calls some of it "global")
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "192.0.2.10",  # documentation
    "198.18.0.1",  # benchmarking
    "::1",
    "::",
    "fe80::1",  # link-local
    "fd00:ec2::254",  # unique-local: AWS metadata over IPv6
    "fc00::1",
    "ff02::1",  # multicast
    "ff0e::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "2002:a00:1::",  # 6to4 around 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 around 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
    "2001:db8::1",  # documentation
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "151.101.1.140", "2606:4700::1111", "2a00:1450:4001::1", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))
    assert not AddressPolicy().allows(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


def test_the_test_relaxation_adds_loopback_and_nothing_else() -> None:
    relaxed = AddressPolicy(allow_loopback=True)
    assert relaxed.allows(ipaddress.ip_address("127.0.0.1"))
    assert relaxed.allows(ipaddress.ip_address("::1"))
    for address in ("10.1.2.3", "169.254.169.254", "192.168.0.1", "fd00:ec2::254", "100.64.0.1"):
        assert not relaxed.allows(ipaddress.ip_address(address))


class _FixedResolver(AbstractResolver):
    """Answers every name with the given addresses (no DNS in tests)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        return [
            {"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
             "proto": 0, "flags": 0}
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_resolver_refuses_a_name_with_any_non_public_address() -> None:
    public = PublicAddressResolver(AddressPolicy(), _FixedResolver("93.184.215.14"))
    assert [r["host"] for r in await public.resolve("example.com", 443)] == ["93.184.215.14"]

    for answer in (("10.0.0.5",), ("93.184.215.14", "169.254.169.254"), ("::ffff:127.0.0.1",), ("fe80::1%2",)):
        with pytest.raises(AddressNotAllowed):
            await PublicAddressResolver(AddressPolicy(), _FixedResolver(*answer)).resolve("rebind.example", 443)


# --- the real guard, against a live loopback server --------------------------------------------


@pytest.fixture
def server(bobby_jpg: bytes):
    with LocalHTTPServer() as server:
        server.serve("/bobby", bobby_jpg, content_type="image/jpeg")
        yield server


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0x7f.1"],
)
async def test_real_guard_refuses_the_loopback_server(server: LocalHTTPServer, host: str) -> None:
    fetcher = ImageFetcher(Settings(allow_http_urls=True))
    try:
        with pytest.raises(AddressNotAllowed, match="public addresses"):
            await fetcher.fetch(f"http://{host}:{server.port}/bobby")
    finally:
        await fetcher.close()
    assert server.request_count == 0


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/x.jpg", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x", "https://[fd00:ec2::254]/"]
)
async def test_real_guard_refuses_private_addresses_before_connecting(url: str) -> None:
    fetcher = ImageFetcher(Settings(allow_http_urls=True))
    with pytest.raises(AddressNotAllowed):
        await fetcher.fetch(url)
    await fetcher.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/a.jpg", "https://"),  # http not configured
        ("ftp://example.com/a.jpg", "https://"),
        ("file:///etc/passwd", "https://"),
        ("https://user:secret@example.com/a.jpg", "user name or password"),
        ("https:///nohost", "no host"),
    ],
)
async def test_only_plain_https_links_are_accepted_by_default(url: str, message: str) -> None:
    fetcher = ImageFetcher(Settings())
    with pytest.raises(ImageFetchError, match=message):
        await fetcher.fetch(url)


# --- the relaxed guard (this module's tests only): the fetcher's other rules ---------------------------


@pytest.fixture
async def loopback_fetcher():
    fetcher = ImageFetcher(
        Settings(allow_http_urls=True, max_image_bytes=200_000, url_timeout_s=1.0), allow_loopback_for_tests=True
    )
    yield fetcher
    await fetcher.close()


async def test_fetches_bytes_and_follows_redirects(server, loopback_fetcher, bobby_jpg):
    assert await loopback_fetcher.fetch(server.url("/bobby")) == bobby_jpg
    server.redirect("/a", "/b", status=301)
    server.redirect("/b", server.url("/bobby"), status=307)
    assert await loopback_fetcher.fetch(server.url("/a")) == bobby_jpg
    assert server.count("/bobby") == 2


@pytest.mark.parametrize(
    "location",
    [
        "http://10.0.0.1/bobby",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[fd00:ec2::254]/",
        "http://100.64.0.1/",
        "http://[::ffff:192.168.0.1]/",
    ],
)
async def test_a_redirect_to_a_private_address_is_refused(server, loopback_fetcher, location):
    server.redirect("/go", location)
    with pytest.raises(AddressNotAllowed):
        await loopback_fetcher.fetch(server.url("/go"))
    assert server.count("/go") == 1  # the redirect was followed by us, and refused


async def test_a_redirect_must_keep_an_allowed_scheme(server, bobby_jpg):
    fetcher = ImageFetcher(Settings(allow_http_urls=True), allow_loopback_for_tests=True)
    server.redirect("/ftp", f"ftp://127.0.0.1:{server.port}/bobby")
    with pytest.raises(ImageFetchError, match="https://"):
        await fetcher.fetch(server.url("/ftp"))
    await fetcher.close()


async def test_redirect_loops_stop(server, loopback_fetcher):
    server.redirect("/loop", "/loop")
    with pytest.raises(ImageFetchError, match="redirects more than"):
        await loopback_fetcher.fetch(server.url("/loop"))
    assert server.count("/loop") == MAX_REDIRECTS + 1


async def test_size_is_bounded_with_and_without_a_content_length(server, loopback_fetcher):
    big = b"\xff" * 1_000_000
    server.serve("/declared", big)
    server.serve("/undeclared", big, content_length=-1)  # the body just runs on
    for path in ("/declared", "/undeclared"):
        with pytest.raises(ImageFetchError, match="larger than"):
            await loopback_fetcher.fetch(server.url(path))


async def test_time_is_bounded(server, loopback_fetcher):
    server.serve("/slow", b"late", delay_s=3.0)
    server.serve("/trickle", b"x" * 100, body_delay_s=3.0)
    for path in ("/slow", "/trickle"):
        with pytest.raises(ImageFetchError, match="longer than 1 s"):
            await loopback_fetcher.fetch(server.url(path))


async def test_http_errors_and_dropped_connections_are_reported(server, loopback_fetcher):
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        await loopback_fetcher.fetch(server.url("/missing"))
    server.serve("/cut", b"y" * 50_000, drop_after=1000)
    with pytest.raises(ImageFetchError, match="failed"):
        await loopback_fetcher.fetch(server.url("/cut"))
