"""A lock in a shared Redis tier, so one process fills a cold key while the others wait.

aiocache's RedLock only coordinates callers inside one process; edge runs several
workers (and usually several hosts) against one Redis, and a popular cold key would
otherwise be transformed once per process. ``RedisFillLock`` is the primitive: SET NX PX
with a random token, release only if the token still matches (a Lua compare-and-delete,
so a holder whose lock expired never releases its successor's), and a check that it is
still held. ``ResultCache.fill_lock`` builds the waiting policy on top.
"""

from __future__ import annotations

import secrets

from aiocache.base import BaseCache

# KEYS[1] the lock, ARGV[1] our token: delete only what we still own
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class RedisFillLock:
    """One attempt at the fill lock of one key; owns its token. Calls may raise any
    backend error: the caller bounds them and decides to fail open."""

    def __init__(self, backend: BaseCache, name: str) -> None:
        self._backend = backend
        self.name = name
        self._token = secrets.token_hex(16).encode()

    async def try_acquire(self, hold: float) -> bool:
        """Take the lock for ``hold`` seconds if nobody holds it; True if taken."""
        millis = max(1, int(hold * 1000))
        taken = await self._backend.raw("set", self.name, self._token, nx=True, px=millis)
        return bool(taken)

    async def release(self) -> bool:
        """Release the lock if it is still ours; True if it was."""
        released = await self._backend.raw("eval", _RELEASE, 1, self.name, self._token)
        return bool(released)

    async def is_held(self) -> bool:
        """Whether anyone (this attempt included) holds the lock now."""
        return bool(await self._backend.raw("exists", self.name))
