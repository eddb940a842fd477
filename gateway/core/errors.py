"""The exceptions that mean "a backing service cannot answer now", defined once for both services."""

from __future__ import annotations

from typing import Final

import asyncpg
from redis.exceptions import RedisError

# Postgres cannot answer now (down, restarting, refusing connections, overloaded, cut off): the answer is 503
# with Retry-After, never a decision. The admin service treats every other database error as a bug (500).
STORE_UNAVAILABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # admin shutdown, cannot connect now, query cancelled
    asyncpg.InsufficientResourcesError,  # too many connections, out of memory or disk
)
# What the gateway's request path treats as store trouble: every database error, so that no query failure
# can ever turn into a 401, a 500 or a forwarded request.
STORE_ERRORS: Final = (*STORE_UNAVAILABLE, asyncpg.PostgresError)
# Redis is optional at run time: any of these means "continue without the shared tier".
# RuntimeError: uvloop raises it when redis-py writes to a pooled connection whose peer reset it (the
# transport is already closed); redis-py drops that connection, so the next call reconnects.
REDIS_ERRORS: Final = (TimeoutError, RedisError, OSError, RuntimeError)
