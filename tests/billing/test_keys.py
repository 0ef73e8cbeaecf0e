"""Billing keys: private files, account ids, signatures that never raise on bad input."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from cellvpn.billing.keys import (
    KeyFileError,
    KeyPair,
    account_of,
    create_key,
    load_key,
    load_or_create_key,
    verify,
)
from cellvpn.wire.receipt import SIG_TYPE_ED25519


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_created_key_is_0600_in_a_0700_folder_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "provider.key"
    old = os.umask(0)  # the worst umask: the modes must not depend on it
    try:
        made = create_key(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = load_key(path)
    assert loaded.public == made.public and len(loaded.public) == 32
    assert loaded == made and loaded != KeyPair.generate()
    assert loaded.account == hashlib.sha3_256(made.public).digest() == account_of(made.public)
    assert loaded.account_hex == loaded.account.hex()
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_an_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    first = create_key(path)
    with pytest.raises(KeyFileError, match="already exists"):
        create_key(path)
    assert load_key(path).public == first.public


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "state" / "billing.key"
    made, created = load_or_create_key(path)
    again, created_again = load_or_create_key(path)
    assert created and not created_again
    assert again.public == made.public


@pytest.mark.parametrize("bits", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_a_key_others_may_access_is_refused_with_path_and_mode(tmp_path: Path, bits: int) -> None:
    path = tmp_path / "open.key"
    create_key(path)
    os.chmod(path, bits)
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    assert str(info.value) == (
        f"key file {path} has mode {bits:04o}: group and others must have no access to a "
        f"private key (chmod 600 {path})"
    )


def test_missing_unreadable_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=f"key file {tmp_path}/none.key does not exist"):
        load_key(tmp_path / "none.key")
    with pytest.raises(KeyFileError, match="is not a regular file"):
        load_key(tmp_path)
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(KeyFileError, match="holds no readable PEM private key"):
        load_key(junk)
    other = tmp_path / "ec.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    other.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_key(other)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.key"
        create_key(locked)
        locked.chmod(0o000)
        with pytest.raises(KeyFileError, match="cannot read key file"):
            load_key(locked)


def test_sign_and_verify_round_trip() -> None:
    pair = KeyPair.generate()
    sig = pair.sign(b"receipt info")
    assert len(sig) == 64
    assert verify(pair.public, sig, b"receipt info")
    assert not verify(pair.public, sig, b"receipt info!")
    assert not verify(KeyPair.generate().public, sig, b"receipt info")
    wire = pair.signature(b"x")
    assert wire.public_key == pair.public and wire.sig_type == SIG_TYPE_ED25519
    assert verify(wire.public_key, wire.signature, b"x")


@settings(max_examples=300, deadline=None)
@given(public=st.binary(max_size=40), signature=st.binary(max_size=70), data=st.binary())
def test_verify_never_raises(public: bytes, signature: bytes, data: bytes) -> None:
    assert verify(public, signature, data) in (False, True)


def test_verify_never_raises_on_odd_types() -> None:
    assert verify(b"\0" * 32, b"\0" * 64, b"") is False  # a low-order point, not a valid key
    assert verify(None, None, None) is False  # type: ignore[arg-type]
    assert verify(bytearray(32), memoryview(bytes(64)), b"") is False  # type: ignore[arg-type]
