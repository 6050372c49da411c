"""Which Redis errors are an outage (retry) and which are the configuration (stop)."""

from __future__ import annotations

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

# Redis cannot be used right now. The cluster client says "no node answers" or "slot not
# covered" with RedisClusterException, which is not a RedisError.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisError, RedisClusterException, OSError, TimeoutError,
)

# Error replies that waiting does not change: the credentials, the ACL, the database index.
_CONFIG_REPLIES = ("WRONGPASS", "NOAUTH", "NOPERM", "DB INDEX", "INVALID USERNAME")


def refuses_the_config(exc: BaseException) -> bool:
    """Whether Redis refused the configured connection itself (a wrong password, an ACL, a
    database index the server does not have), as opposed to a passing state: BUSY (another
    client's script), MASTERDOWN or LOADING (a replica resyncing, a restart), READONLY (a
    failover in progress)."""
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return True
    if isinstance(exc, ResponseError):
        text = str(exc).upper()
        return any(word in text for word in _CONFIG_REPLIES)
    return False
