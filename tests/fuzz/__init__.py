"""cellvpn's fuzz harness: hostile bytes into every decoder and protocol handler.

One module per target family (decoders, offload, stream, server sessions, client stream).
Inputs per target come from ``CELLVPN_FUZZ_EXAMPLES`` (``harness.py``): a hundred in the
default suite, a million in ``make fuzz``, which prints each target's tally at the end.
"""
