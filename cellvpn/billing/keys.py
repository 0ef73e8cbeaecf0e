"""Billing keys: Ed25519 key pairs whose public key hash is the account id.

A key file is an unencrypted PKCS#8 PEM Ed25519 private key (what ``openssl genpkey -algorithm
ed25519`` writes). It is the account's money, so it is created 0600 in a 0700 folder and a file
that group or others may access is refused, as ssh refuses a private key others can read.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cellvpn.wire.receipt import SIG_TYPE_ED25519, Signature

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
#: Permission bits a key file must not have: anything for group or others.
_PRIVATE_MASK = 0o077


class KeyFileError(Exception):
    """A key file that cannot be used; the message is one line naming the file."""


def account_of(public: bytes) -> bytes:
    """The account id of a public key: SHA3-256 of its raw 32 bytes (the original's pkey hash)."""
    return hashlib.sha3_256(bytes(public)).digest()


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``data``; never raises."""
    try:
        if len(public) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            return False
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes(public))
        key.verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def signed_by(sig: Signature, public: bytes, data: bytes) -> bool:
    """Whether a receipt signature is ``public``'s valid Ed25519 signature of ``data``."""
    return (
        sig.public_key == public
        and sig.sig_type == SIG_TYPE_ED25519
        and verify(public, sig.signature, data)
    )


@dataclass(frozen=True, eq=False)
class KeyPair:
    """An account's Ed25519 private key and what follows from it (equal by public key)."""

    private: ed25519.Ed25519PrivateKey = field(repr=False)
    public: bytes = field(init=False)
    account: bytes = field(init=False)

    def __post_init__(self) -> None:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        object.__setattr__(self, "public", raw)
        object.__setattr__(self, "account", account_of(raw))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyPair) and other.public == self.public

    def __hash__(self) -> int:
        return hash(self.public)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """The key pair of a 32-byte seed (tests and benchmarks want reproducible keys)."""
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def account_hex(self) -> str:
        return self.account.hex()

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(bytes(data))

    def signature(self, data: bytes) -> Signature:
        """A receipt signature (dap_sign_t shape) of ``data`` by this key."""
        return Signature(self.public, self.sign(data), SIG_TYPE_ED25519)

    def pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _mode_text(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def load_key(path: str | os.PathLike[str]) -> KeyPair:
    """The key pair in ``path``; refuses a file that group or others may access."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from None
    try:
        # fstat the open file, so the mode checked is the mode of the bytes read.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if info.st_mode & _PRIVATE_MASK:
            raise KeyFileError(
                f"key file {path} has mode {_mode_text(info.st_mode)}: group and others must "
                f"have no access to a private key (chmod 600 {path})"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(64 * 1024)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(
            f"key file {path} is encrypted; cellvpn needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"key file {path} holds no readable PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return KeyPair(key)


def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_key(path: str | os.PathLike[str]) -> KeyPair:
    """Generate a key and write it to ``path``, which must not exist yet.

    The key is written in full to a temporary file (O_EXCL, 0600) and hard-linked to ``path``:
    the link fails if ``path`` appeared meanwhile, and a crash never leaves a half-written key
    under its real name. Missing parent folders are created 0700.
    """
    path = Path(path)
    pair = KeyPair.generate()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise KeyFileError(
            f"cannot create the folder of key file {path}: {e.strerror or e}"
        ) from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(pair.pem())
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; it is never overwritten") from None
    except OSError as e:
        raise KeyFileError(f"cannot write key file {path}: {e.strerror or e}") from None
    finally:
        with suppress(OSError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return pair


def load_or_create_key(path: str | os.PathLike[str]) -> tuple[KeyPair, bool]:
    """The key in ``path``, created first if missing; the flag says whether it was created."""
    path = Path(path)
    if not os.path.lexists(path):
        try:
            return create_key(path), True
        except KeyFileError:
            if not os.path.lexists(path):
                raise
            # Another process created it first: use theirs.
    return load_key(path), False
