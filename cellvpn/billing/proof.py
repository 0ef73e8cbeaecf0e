"""The REQUEST extension: the client's public key and its signature over this session.

After the original's 122-byte REQUEST header cellvpn appends::

    public key (32)  ||  Ed25519 signature (64)

The signature covers ``b"cellvpn-request\\0" || session_id (u32, little-endian) || tx_cond
|| order_hash``. The session id is the server's fresh random number from WELCOME, so a
signature cannot be replayed on another session: grace periods, bans and saved limits belong
to a key the client has proven it holds, not to a hash anyone can send.
"""

from __future__ import annotations

from cellvpn.billing.keys import KeyPair, account_of, verify
from cellvpn.wire.errors import DecodeError
from cellvpn.wire.service import Request

EXTENSION_SIZE = 32 + 64
_CONTEXT = b"cellvpn-request\0"


def proof_message(session_id: int, tx_cond: bytes, order_hash: bytes) -> bytes:
    return _CONTEXT + session_id.to_bytes(4, "little") + tx_cond + order_hash


def sign_request(request: Request, key: KeyPair, session_id: int) -> Request:
    """``request`` with the client's account hash and the proof extension filled in."""
    from dataclasses import replace

    message = proof_message(session_id, request.tx_cond, request.order_hash)
    return replace(request, client_pkey_hash=key.account, extension=key.public + key.sign(message))


def proven_key(request: Request, session_id: int) -> bytes:
    """The client's public key if the extension proves it; DecodeError (with why) otherwise."""
    ext = request.extension
    if len(ext) < EXTENSION_SIZE:
        raise DecodeError("REQUEST carries no key proof")
    public, signature = ext[:32], ext[32:EXTENSION_SIZE]
    if account_of(public) != request.client_pkey_hash:
        raise DecodeError("REQUEST key does not match its client_pkey_hash")
    message = proof_message(session_id, request.tx_cond, request.order_hash)
    if not verify(public, signature, message):
        raise DecodeError("REQUEST signature is not valid for this session")
    return public
