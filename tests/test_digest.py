"""Digest: parsing, printing, equality, hashing and every kind of malformed input."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from fastmat import EMPTY_DIGEST, Digest, InvalidDigestError

HELLO = hashlib.sha256(b"hello").hexdigest()


def test_of_str_parse_roundtrip() -> None:
    d = Digest.of(b"hello")
    assert d == Digest(HELLO, 5)
    assert str(d) == f"{HELLO}/5"
    assert Digest.parse(str(d)) == d
    assert Digest.parse(f"  {HELLO}/5\n") == d  # surrounding whitespace is tolerated
    assert d.key == f"{HELLO}-5"


def test_empty_digest() -> None:
    assert Digest.of(b"") == EMPTY_DIGEST
    assert EMPTY_DIGEST.size_bytes == 0
    assert EMPTY_DIGEST.hash == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_equality_and_hash() -> None:
    a, b = Digest(HELLO, 5), Digest.parse(f"{HELLO}/5")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, Digest(HELLO, 6)}) == 2
    assert a != Digest(HELLO, 6)
    assert a != Digest.of(b"hellp")
    assert {a: 1}[b] == 1


def test_immutable() -> None:
    d = Digest.of(b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.size_bytes = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        "",
        HELLO,  # no size
        f"{HELLO}/",  # empty size
        f"{HELLO}/-1",
        f"{HELLO}/1.5",
        f"{HELLO}/0x10",
        f"{HELLO}/５",  # non-ASCII digit  # noqa: RUF001
        f"{HELLO.upper()}/5",  # upper-case hex
        f"{HELLO[:-1]}/5",  # 63 digits
        f"{HELLO}0/5",  # 65 digits
        f"{HELLO[:-1]}g/5",
        "/5",
        f"{HELLO}/5/6",
        f"{HELLO} /5",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidDigestError):
        Digest.parse(text)


def test_invalid_digest_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="hash/size"):
        Digest.parse("nonsense")


@pytest.mark.parametrize(
    ("h", "size"),
    [
        ("0" * 63, 1),
        ("z" * 64, 1),
        (HELLO, -1),
        (HELLO, True),
        (HELLO, 1.0),
        (b"0" * 64, 1),
        (HELLO, "5"),
    ],
)
def test_constructor_rejects(h: object, size: object) -> None:
    with pytest.raises(InvalidDigestError):
        Digest(h, size)  # type: ignore[arg-type]


def test_coerce_takes_a_digest_or_its_text() -> None:
    d = Digest(HELLO, 5)
    assert Digest.coerce(d) is d
    assert Digest.coerce(f"{HELLO}/5") == d
    with pytest.raises(InvalidDigestError, match="hash/size"):
        Digest.coerce(f"{HELLO}-5")  # the on-disk key is not the text form
    with pytest.raises(InvalidDigestError, match="bytes"):
        Digest.coerce(b"x")  # type: ignore[arg-type]
