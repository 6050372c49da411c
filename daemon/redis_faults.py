"""Which Redis errors are an outage (retry) and which are the configuration (stop)."""

from __future__ import annotations

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

# Redis cannot be used right now. The cluster client says "no node answers" or "slot not
# covered" with RedisClusterException, which is not a RedisError.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisError, RedisClusterException, OSError, TimeoutError,
)

# Error replies that waiting does not change, as redis-py leaves their text (it strips the
# code of those it has a class for): the database index, a renamed command, SELECT on a
# cluster, and a cluster client pointed at a server that is no cluster.
_CONFIG_TEXTS = ("DB INDEX", "UNKNOWN COMMAND", "NOT ALLOWED IN CLUSTER MODE",
                 "CLUSTER MODE IS NOT ENABLED", "WRONGPASS", "NOAUTH", "NOPERM")


def refuses_the_config(exc: BaseException) -> bool:
    """Whether Redis refused the configured connection itself (a wrong password, an ACL, a
    database index the server does not have, a renamed command, cluster = true against a
    plain server), as opposed to a passing state: BUSY (another client's script),
    MASTERDOWN or LOADING (a replica resyncing, a restart), READONLY (a failover), a
    cluster none of whose nodes answers yet."""
    if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError):
        return True
    if isinstance(exc, ResponseError | RedisClusterException):
        text = str(exc).upper()
        return any(words in text for words in _CONFIG_TEXTS)
    return False
