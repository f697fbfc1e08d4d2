"""Downloading an image from a URL a user gave us, without letting the URL reach inside.

A link in a chat message is untrusted input: pointed at `http://169.254.169.254/` or
`http://localhost:6379/` it would make the bot fetch from the machine's own network (SSRF).
So every fetch here:

- accepts `https://` only (`http://` too when `settings.allow_http_urls`);
- connects to public addresses only.  Names are resolved by `PublicAddressResolver`, which
  refuses the whole name if any address it resolves to is not public; aiohttp then connects to
  exactly the address that was checked, so a name that answers differently a second time (DNS
  rebinding) gains nothing.  IP literals never reach a resolver in aiohttp, so they are checked
  before each request;
- follows redirects itself (at most `MAX_REDIRECTS`), applying the scheme and address checks
  to every hop;
- stops after `settings.url_timeout_s` in all and after `settings.max_image_bytes` of body.

What the bytes are is not judged from the URL or the Content-Type: the image decoder in the
worker decides that, as for attachments.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from config import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_CHUNK_BYTES = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "discord-vision-bot (+image fetcher)"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud instance-metadata endpoints.  All of them are already non-public (link-local, CGNAT,
#: unique-local); named here so the intent survives any change in `ipaddress`'s tables.
CLOUD_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
#: NAT64 well-known prefix: 64:ff9b::a.b.c.d reaches the IPv4 address a.b.c.d.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Ranges that are not public but that `ipaddress` (as of Python 3.11) calls global: the
#: deprecated site-local prefix (RFC 3879; still routed inside some networks) and the
#: documentation prefix of RFC 9637 (2024), newer than the module's tables.
_ALSO_NOT_PUBLIC = (ipaddress.ip_network("fec0::/10"), ipaddress.ip_network("3fff::/20"))
#: One label of a DNS name as it goes on the wire: letters, digits and inner hyphens, 1–63
#: characters (RFC 1123).  Internationalised names arrive here already IDNA-encoded ("xn--…").
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII | re.IGNORECASE)
_MAX_DNS_NAME = 253


class ImageFetchError(Exception):
    """A URL could not be fetched; `str(error)` is one line fit to show the user."""


class AddressNotAllowed(ImageFetchError, OSError):
    """The URL's host is, or resolves to, an address that is not public.

    An `OSError` too, so that when the resolver raises it inside aiohttp's connector it comes
    back as a connection error that still carries it as the cause.
    """


def is_public_address(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses (IPv4 or IPv6).

    Refused: loopback, private (RFC 1918, unique-local), link-local, site-local, CGNAT (100.64/10),
    multicast, reserved, unspecified, documentation and benchmark ranges, cloud metadata — and IPv6
    addresses that embed an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64) unless that IPv4 address
    is public too.
    """
    if address in CLOUD_METADATA_ADDRESSES:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _ALSO_NOT_PUBLIC):
            return False
        for embedded in _embedded_ipv4(address):
            if not is_public_address(embedded):
                return False
        if address.ipv4_mapped is not None or address in _NAT64:
            # Its IPv4 address was public.  (NAT64 addresses are what DNS64 hands out for
            # every IPv4-only site on an IPv6-only network; `ipaddress` calls them reserved.)
            return True
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
        and not address.is_loopback
        and not address.is_link_local
        and not address.is_private
    )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    embedded: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        embedded.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address.teredo is not None:
        embedded.extend(address.teredo)
    if address in _NAT64:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return embedded


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a fetch may connect to: public ones, plus loopback in tests only."""

    allow_loopback: bool = False

    def allows(self, address: IPAddress) -> bool:
        if is_public_address(address):
            return True
        if self.allow_loopback:
            mapped = getattr(address, "ipv4_mapped", None)
            return address.is_loopback or (mapped is not None and mapped.is_loopback)
        return False

    def check(self, address: IPAddress, shown_as: str) -> None:
        if not self.allows(address):
            raise AddressNotAllowed(
                f"I only fetch images from public addresses; {shown_as} is not one."
            )


class PublicAddressResolver(AbstractResolver):
    """aiohttp resolver that refuses a name when any address it resolves to is not allowed.

    aiohttp connects to the addresses a resolver returns, so every connection — the first
    request and each redirect — goes to an address that passed the check.
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            # Strip an IPv6 zone ("fe80::1%eth0"): ipaddress would reject it, and such an
            # address is link-local anyway.
            address = ipaddress.ip_address(result["host"].split("%", 1)[0])
            self._policy.check(address, f"{host} ({address})")
        if not results:
            raise AddressNotAllowed(f"{host} does not resolve to any address.")
        return results

    async def close(self) -> None:
        await self._inner.close()


def is_dns_name(host: str) -> bool:
    """True for a syntactically valid DNS name in its ASCII form ("example.com", "xn--r8jz45g.jp",
    "example.com." with the root's dot); false for anything aiohttp might read otherwise."""
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= _MAX_DNS_NAME and all(_DNS_LABEL.fullmatch(label) for label in name.split("."))


class ImageFetcher:
    """Fetches image bytes from user-supplied URLs under the rules in the module docstring.

    `allow_loopback_for_tests` additionally lets it connect to 127.0.0.1/::1, for tests that
    run an HTTP server on the loopback interface.  It is a constructor argument on purpose, not
    a setting: nothing a user configures can turn it on.
    """

    def __init__(self, settings: Settings, *, allow_loopback_for_tests: bool = False) -> None:
        self.allow_http = settings.allow_http_urls
        self.timeout_s = settings.url_timeout_s
        self.max_bytes = settings.max_image_bytes
        self.policy = AddressPolicy(allow_loopback=allow_loopback_for_tests)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use: a ClientSession belongs to the running event loop.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=PublicAddressResolver(self.policy), limit_per_host=4
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
                # Never through a proxy from the environment: the proxy would do the
                # connecting, past the address checks.
                trust_env=False,
                # No cookies: nothing from one user's fetch may leak into another's.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Bodies are counted as they arrive: a compressed body could inflate past the
                # size limit after the check.
                auto_decompress=False,
            )
        return self._session

    def check_url(self, url: str | yarl.URL) -> yarl.URL:
        """Parse and check a URL's form (scheme, host; an IP-literal host's address)."""
        try:
            parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
        except (ValueError, TypeError):  # UnicodeError is a ValueError
            raise ImageFetchError("That link is not a valid URL.") from None
        scheme = (parsed.scheme or "").lower()
        allowed = ("https", "http") if self.allow_http else ("https",)
        if scheme not in allowed:
            if scheme == "http":
                raise ImageFetchError("I only fetch images from https:// links.")
            raise ImageFetchError("I only fetch images from web (https://) links.")
        host = parsed.raw_host
        if not host:
            raise ImageFetchError("That link has no host name.")
        if parsed.user or parsed.password:
            raise ImageFetchError("I don't fetch links that carry a user name or password.")
        # aiohttp decides by the host's form whether it is an address (connected to directly)
        # or a name (resolved, so checked by our resolver).  So the host must be one of the
        # two unambiguously: an IP literal we check here, or a plain DNS name.  Anything else
        # (say "xn--:1-9ia.example.test", the IDNA form of "[é:1.example.test]") could be
        # taken for an address by aiohttp and connected to past the resolver.
        try:
            literal: IPAddress | None = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            literal = None
        if literal is not None:
            self.policy.check(literal, host)
        elif not is_dns_name(host):
            raise ImageFetchError("That link's host is not a valid host name.")
        return parsed

    async def fetch(self, url: str) -> bytes:
        """The body at `url` (after redirects), at most `max_bytes` of it, within the time limit.

        Every failure is an `ImageFetchError` with a line for the user, so that one bad link
        costs only its own image.
        """
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch_following_redirects(self.check_url(url))
        except TimeoutError:
            raise ImageFetchError(
                f"That link took longer than {self.timeout_s:g} s to download."
            ) from None
        except (UnicodeError, ValueError) as error:
            # yarl and aiohttp raise these for a malformed URL or Location header (a bad port,
            # a host that IDNA cannot encode), wherever in the redirect chain it turns up.
            log.info("a link could not be parsed: %r", error)
            raise ImageFetchError("That link (or a link it redirects to) is not a valid URL.") from None

    async def _fetch_following_redirects(self, target: yarl.URL) -> bytes:
        session = self._get_session()
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                async with session.get(target, allow_redirects=False) as response:
                    if response.status in _REDIRECT_STATUSES:
                        location = response.headers.get("Location")
                        if not location:
                            raise ImageFetchError("That link redirects nowhere.")
                        target = self.check_url(target.join(yarl.URL(location)))
                        continue
                    if response.status != 200:
                        raise ImageFetchError(
                            f"That link answered HTTP {response.status} instead of an image."
                        )
                    return await self._read_bounded(response)
            except aiohttp.ClientConnectorError as error:
                cause = error.os_error
                if isinstance(cause, AddressNotAllowed):
                    raise cause from None
                raise ImageFetchError(f"I could not connect to {target.host}.") from error
            except AddressNotAllowed:
                raise
            except aiohttp.ClientError as error:
                log.info("fetching %s failed: %r", target.host, error)
                raise ImageFetchError(f"Downloading from {target.host} failed.") from error
        raise ImageFetchError(f"That link redirects more than {MAX_REDIRECTS} times.")

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> bytes:
        too_large = ImageFetchError(
            f"That image is larger than the {self.max_bytes / (1024 * 1024):.0f} MB I accept."
        )
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise too_large
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large  # stop reading: the rest is never downloaded
        return bytes(body)
