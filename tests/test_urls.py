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
    "fec0::1",  # site-local (deprecated, still not public; ipaddress calls it global)
    "feff:ffff::1",
    "3fff::1",  # documentation, RFC 9637 (newer than ipaddress's tables)
    "3fff:fff:ffff::1",
]
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "151.101.1.140", "2606:4700::1111", "2a00:1450:4001::1", "::ffff:8.8.8.8", "64:ff9b::808:808",
    "3fff:1000::1",  # just past RFC 9637's 3fff::/20
]


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


@pytest.mark.parametrize(
    "url",
    [
        "https://[é:1.example.test]/",  # IDNA turns it into "xn--:1-9ia.example.test": aiohttp sees an address
        "https://exa_mple.com/",
        "https://a..example/",
        "https://-a.example/",
        "https://a-.example/",
        "https://foo%2e.example/",
        "https://a\x00b.example/",
        "https://ex ample.example/",
        "https://" + "a" * 64 + ".example/",  # a label longer than 63
        "https://" + "a." * 127 + "example/",  # a name longer than 253
    ],
)
async def test_a_host_that_is_neither_an_address_nor_a_dns_name_is_refused(server, loopback_fetcher, url):
    with pytest.raises(ImageFetchError, match="not a valid host name"):
        loopback_fetcher.check_url(url)
    # …also when a redirect leads there (the loopback server is allowed, the host is not).
    if "\x00" not in url and " " not in url:  # what an HTTP header can carry (UTF-8 on the wire)
        server.redirect("/odd", url.encode().decode("latin-1"))
        with pytest.raises(ImageFetchError, match="not a valid host name"):
            await loopback_fetcher.fetch(server.url("/odd"))


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://例え.jp/a", "xn--r8jz45g.jp"),
        ("https://xn--r8jz45g.jp/", "xn--r8jz45g.jp"),
        ("https://Example.COM./a.jpg", "example.com."),
        ("https://a-b.c0.example/", "a-b.c0.example"),
        ("https://[2606:4700::1111]/", "2606:4700::1111"),
    ],
)
def test_dns_names_and_checked_literals_pass_the_form_check(url, host):
    assert ImageFetcher(Settings()).check_url(url).raw_host == host


@pytest.mark.parametrize("url", ["https://\udcff.example/", "https://example.com:99999/", "http://[::1/", "https://[::1]x/"])
async def test_malformed_links_are_one_fetch_error(url):
    fetcher = ImageFetcher(Settings(allow_http_urls=True))
    try:
        with pytest.raises(ImageFetchError, match="not a valid URL"):
            await fetcher.fetch(url)
    finally:
        await fetcher.close()


@pytest.mark.parametrize("location", ["//[é:1.x]/", "http://127.0.0.1:99999/", "http://[::1/", "http://\udcff.example/"])
async def test_a_malformed_location_is_one_fetch_error_and_the_next_fetch_works(server, loopback_fetcher, bobby_jpg, location):
    server.redirect("/bad", location.encode("utf-8", "surrogateescape").decode("latin-1"))
    with pytest.raises(ImageFetchError, match="not a valid URL"):
        await loopback_fetcher.fetch(server.url("/bad"))
    assert await loopback_fetcher.fetch(server.url("/bobby")) == bobby_jpg  # the other images go on


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


# --- found by mutation testing (mutmut over bot/urls.py) ----------------------------------------


def test_teredo_addresses_are_refused_not_a_crash() -> None:
    # Teredo (2001::/32) embeds the server's IPv4 address; every embedded address is checked.
    for address in ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:a00:1::f5ff:fffe"):
        assert not is_public_address(ipaddress.ip_address(address))


def test_the_test_relaxation_also_allows_ipv4_mapped_loopback() -> None:
    relaxed = AddressPolicy(allow_loopback=True)
    assert relaxed.allows(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not relaxed.allows(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert not AddressPolicy().allows(ipaddress.ip_address("::ffff:127.0.0.1"))


class _RecordingResolver(_FixedResolver):
    def __init__(self, *addresses: str) -> None:
        super().__init__(*addresses)
        self.calls: list[tuple[str, int, socket.AddressFamily]] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        self.calls.append((host, port, family))
        return await super().resolve(host, port, family)


async def test_resolver_asks_its_inner_resolver_the_same_question() -> None:
    inner = _RecordingResolver("2606:4700::1111")
    await PublicAddressResolver(AddressPolicy(), inner).resolve("example.com", 443, socket.AF_INET6)
    assert inner.calls == [("example.com", 443, socket.AF_INET6)]


async def test_resolver_refusals_name_the_host_and_its_address() -> None:
    with pytest.raises(AddressNotAllowed, match=r"rebind\.example \(10\.0\.0\.5\) is not one"):
        await PublicAddressResolver(AddressPolicy(), _FixedResolver("10.0.0.5")).resolve("rebind.example", 443)
    with pytest.raises(AddressNotAllowed, match=r"^nowhere\.example does not resolve to any address\.$"):
        await PublicAddressResolver(AddressPolicy(), _FixedResolver()).resolve("nowhere.example", 443)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url at all", "I only fetch images from web (https://) links."),
        ("http://example.com/a.jpg", "I only fetch images from https:// links."),
        ("HTTP://example.com/a.jpg", "I only fetch images from https:// links."),
        ("ftp://example.com/a.jpg", "I only fetch images from web (https://) links."),
        ("https:///nohost", "That link has no host name."),
        ("https://user@example.com/a.jpg", "I don't fetch links that carry a user name or password."),
        ("https://:secret@example.com/a.jpg", "I don't fetch links that carry a user name or password."),
        ("https://exa_mple.com/", "That link's host is not a valid host name."),
        ("https://[fd00:ec2::254]/", "I only fetch images from public addresses; fd00:ec2::254 is not one."),
        ("https://[::1/", "That link is not a valid URL."),
    ],
)
def test_check_url_says_exactly_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ImageFetchError) as caught:
        ImageFetcher(Settings()).check_url(url)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "url",
    [
        "https://example.a-./",  # the root's dot does not hide a bad last label
        "https://exa_mple.com./",
        "https://" + "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62 + "/",  # 254 characters
    ],
)
def test_names_with_a_root_dot_or_one_character_too_long_are_refused(url: str) -> None:
    with pytest.raises(ImageFetchError, match="not a valid host name"):
        ImageFetcher(Settings()).check_url(url)


@pytest.mark.parametrize(
    "host",
    ["x", "x.", "a" * 62 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62],  # the last: 253 characters, the limit
)
def test_one_letter_names_and_names_of_the_maximum_length_pass(host: str) -> None:
    assert ImageFetcher(Settings()).check_url(f"https://{host}/").raw_host == host


async def test_the_fetcher_works_again_after_close(server, loopback_fetcher, bobby_jpg):
    assert await loopback_fetcher.fetch(server.url("/bobby")) == bobby_jpg
    await loopback_fetcher.close()
    assert await loopback_fetcher.fetch(server.url("/bobby")) == bobby_jpg


async def test_a_redirect_without_a_location_and_a_closed_port_are_explained(server, loopback_fetcher):
    server.serve("/nowhere", b"", status=302)
    with pytest.raises(ImageFetchError) as caught:
        await loopback_fetcher.fetch(server.url("/nowhere"))
    assert str(caught.value) == "That link redirects nowhere."
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(ImageFetchError) as caught:
        await loopback_fetcher.fetch(f"http://127.0.0.1:{closed_port}/x")
    assert str(caught.value) == "I could not connect to 127.0.0.1."


async def test_a_bad_location_is_explained_in_one_line(server, loopback_fetcher):
    server.redirect("/bad", "http://127.0.0.1:99999/")
    with pytest.raises(ImageFetchError) as caught:
        await loopback_fetcher.fetch(server.url("/bad"))
    assert str(caught.value) == "That link (or a link it redirects to) is not a valid URL."


async def test_a_body_of_exactly_the_limit_is_accepted_and_the_message_gives_the_limit(server):
    limit = 2 * 1024 * 1024
    fetcher = ImageFetcher(Settings(allow_http_urls=True, max_image_bytes=limit), allow_loopback_for_tests=True)
    try:
        server.serve("/declared", b"\xff" * limit)
        server.serve("/undeclared", b"\xff" * limit, content_length=-1)
        server.serve("/over", b"\xff" * (limit + 1), content_length=-1)
        for path in ("/declared", "/undeclared"):
            assert len(await fetcher.fetch(server.url(path))) == limit
        with pytest.raises(ImageFetchError) as caught:
            await fetcher.fetch(server.url("/over"))
        assert str(caught.value) == "That image is larger than the 2 MB I accept."
    finally:
        await fetcher.close()


@pytest.fixture
async def recording_server():
    """An aiohttp server on 127.0.0.1 that records each request's headers; `/cookie` sets a
    cookie, `/gzip` answers a gzip-encoded body, `/plain` a plain one."""
    import gzip

    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        if request.path == "/cookie":
            response = web.Response(body=b"ok")
            response.set_cookie("session", "user-a-secret")
            return response
        if request.path == "/gzip":
            return web.Response(body=gzip.compress(b"\0" * 100_000), headers={"Content-Encoding": "gzip"})
        return web.Response(body=b"plain")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_requests_name_the_bot_ask_for_no_encoding_and_carry_no_cookies(recording_server):
    base, seen = recording_server
    fetcher = ImageFetcher(Settings(allow_http_urls=True, max_image_bytes=50_000), allow_loopback_for_tests=True)
    try:
        # By name: a cookie jar keeps no cookies from IP-address hosts anyway.
        named = base.replace("127.0.0.1", "localhost")
        await fetcher.fetch(f"{named}/cookie")  # one user's link sets a cookie…
        await fetcher.fetch(f"{named}/plain")  # …which the next user's fetch must not send
        # A compressed body is counted as it arrives, never inflated: 100 kB of zeros gzip to
        # a few hundred bytes, under the 50 kB limit, and come back as those bytes.
        compressed = await fetcher.fetch(f"{base}/gzip")
    finally:
        await fetcher.close()
    assert compressed[:2] == b"\x1f\x8b" and len(compressed) < 50_000
    for headers in seen:
        assert headers.get("User-Agent") == "discord-vision-bot (+image fetcher)"
        assert headers.get("Accept-Encoding") == "identity"
    assert "Cookie" not in seen[1]


async def test_proxies_from_the_environment_are_not_used(server, loopback_fetcher, bobby_jpg, monkeypatch):
    # A proxy would do the connecting, past the address checks: the fetch must go direct.
    with LocalHTTPServer() as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        assert await loopback_fetcher.fetch(server.url("/bobby")) == bobby_jpg
        assert proxy.request_count == 0
