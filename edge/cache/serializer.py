"""The one aiocache serializer edge uses: bytes in, bytes out, nothing interpreted.

aiocache's Redis and memcached backends default to JSON and offer pickle; both are wrong
here. Values are already encoded envelopes (``envelope.encode``), and unpickling bytes read
from a shared cache would let whoever can write to that cache run code in this process.
"""

from __future__ import annotations

from aiocache.serializers import BaseSerializer


class BytesSerializer(BaseSerializer):  # type: ignore[misc]  # aiocache is untyped
    """Passes ``bytes`` through untouched; ``encoding = None`` keeps backends from decoding."""

    DEFAULT_ENCODING = None

    def dumps(self, value: bytes) -> bytes:
        if not isinstance(value, bytes):
            # a str or object here is a programming error; storing it would corrupt readers
            raise TypeError(f"cache values are bytes, not {type(value).__name__}")
        return value

    def loads(self, value: bytes | None) -> bytes | None:
        return value
