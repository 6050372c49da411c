"""Which Redis errors are an outage (retry) and which are the configuration (stop)."""

from __future__ import annotations

import ssl

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
# cluster, a cluster client pointed at a server with cluster support disabled.
_CONFIG_TEXTS = ("DB INDEX", "UNKNOWN COMMAND", "NOT ALLOWED IN CLUSTER MODE",
                 "CLUSTER SUPPORT DISABLED", "WRONGPASS", "NOAUTH", "NOPERM")


def refuses_the_config(exc: BaseException) -> bool:
    """Whether Redis refused the configured connection itself (a wrong password, an ACL, a
    database index the server does not have, a renamed command, cluster = true against a
    plain server, a TLS certificate that does not verify), as opposed to a passing state: BUSY (another client's script),
    MASTERDOWN or LOADING (a replica resyncing, a restart), READONLY (a failover), a
    cluster none of whose nodes answers yet. The cluster client wraps the reply it got in
    its own "cannot be connected ... Cluster mode is not enabled" whatever the reply was
    (a BUSY seed node too): the reply it wraps decides."""
    for link in _chain(exc):
        if isinstance(link, AuthenticationError | AuthorizationError | NoPermissionError):
            return True
        if isinstance(link, ssl.SSLCertVerificationError):  # rediss://: a certificate the
            return True  # configured CA does not vouch for, or another host's name
        if isinstance(link, ResponseError):
            text = str(link).upper()
            if any(words in text for words in _CONFIG_TEXTS):
                return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during, innermost last."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen and len(seen) < 16:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen
