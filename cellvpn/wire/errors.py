"""The one error type of the wire codecs."""


class DecodeError(ValueError):
    """Bytes that do not form a valid value of the codec that was asked to read them.

    Decoders raise only this, so a caller can catch one type, count the bad input and close
    the offending session without masking programming errors elsewhere.
    """
