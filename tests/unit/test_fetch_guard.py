"""The onboarding crawler's address guard (issue #23, point 5): the IPv6 forms that lead back to
IPv4 or to old local ranges are refused, as is every port but 80 and 443, and a refusal never
names the address a name resolves to. Literal addresses only: no network."""

from __future__ import annotations

import pytest

from genx_ray.examples import fetching


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::808:808",  # NAT64 of a public address: still refused (it is a translator's)
        "64:ff9b:1::a00:1",  # local-use NAT64
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:808:808::1",  # 6to4 of a public address
        "::127.0.0.1",  # IPv4-compatible
        "::8.8.8.8",
        "fec0::1",  # site-local
        "fefe::1",
        "::ffff:10.0.0.1",  # IPv4-mapped
        "fe80::1%eth0",
    ],
)
def test_ipv6_ways_back_to_ipv4_and_old_local_ranges_are_private(address: str) -> None:
    assert fetching._private(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1", "2a00:1450:4007:80f::200e"])
def test_public_addresses_stay_public(address: str) -> None:
    assert not fetching._private(address)


@pytest.mark.parametrize(
    "url",
    ["http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "http://[2002:a9fe:a9fe::]/",
     "http://[::169.254.169.254]/", "http://[fec0::1]/"],
)  # fmt: skip
async def test_such_urls_are_refused(url: str) -> None:
    with pytest.raises(fetching.UnsafeURL, match="not a public address"):
        await fetching.resolve_public(url)


@pytest.mark.parametrize("url", ["http://93.184.215.14:8080/", "https://93.184.215.14:22/",
                                 "http://93.184.215.14:6379/"])  # fmt: skip
async def test_only_ports_80_and_443(url: str) -> None:
    with pytest.raises(fetching.UnsafeURL, match="only ports 80 and 443"):
        await fetching.resolve_public(url)
    assert await fetching.resolve_public(url.rsplit(":", 1)[0] + ":443/") == "93.184.215.14"


async def test_allowing_private_urls_allows_other_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fetching.ALLOW_PRIVATE, "1")
    assert await fetching.resolve_public("http://127.0.0.1:8080/") is None  # connect as is


async def test_a_refusal_never_names_the_address_a_name_resolves_to() -> None:
    with pytest.raises(fetching.UnsafeURL) as caught:
        await fetching.resolve_public("http://localhost/")  # /etc/hosts: no network asked
    message = caught.value.message
    assert "'localhost' is not a public address" in message
    assert "127.0.0.1" not in message and "::1" not in message
