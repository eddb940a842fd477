"""The admin service's aiohttp application: resources, middlewares (errors, request id, metrics, auth), routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from admin import openapi
from admin.audit_check import AuditChainCheck
from admin.auth import IDENTITY, REQUEST_ID, AdminAuth
from admin.errors import ApiError, error_response, from_http_exception, json_response, unauthorized
from admin.idempotency import KEY_LIFETIME, RotationReplay
from admin.lifecycle import LifecycleError
from admin.metrics import AdminMetrics
from admin.ui import setup_ui
from admin.ui.web import is_page, pages_middleware
from admin.views import audit, credentials, groups, session, users
from admin.views import webhooks as webhook_views
from admin.views.common import SERVICES, Services
from admin.webhooks import DeliveryWorker
from gateway.core import admin_sql, database, hashing, store
from gateway.core.errors import STORE_UNAVAILABLE
from gateway.core.request_id import request_id_text
from gateway.core.settings import Settings

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API = "/api/v1"
# Expired sessions, old login failures and old idempotency keys are deleted this often.
MAINTENANCE_SECONDS = 60.0
# A constraint the lifecycle did not pre-check only trips when another request changed the same rows
# meanwhile (e.g. a group deleted while a member is added): the client may simply retry.
CONCURRENT_CHANGES = (asyncpg.IntegrityConstraintViolationError, asyncpg.TransactionRollbackError)


async def openapi_document(request: web.Request) -> web.Response:
    gateway = request.app[SERVICES].settings.gateway
    return json_response(openapi.document(gateway.access_key_header, gateway.secret_key_header))


async def health(request: web.Request) -> web.Response:
    async with request.app[SERVICES].pool.acquire() as conn:
        await conn.fetchval(store.PING)
    return json_response({"status": "ok"})


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/openapi.json", openapi_document),
    ("GET", "/health", health),
    ("POST", "/session", session.login),
    ("GET", "/session", session.show),
    ("DELETE", "/session", session.logout),
    ("PUT", "/me/password", session.change_password),
    ("GET", "/users", users.list_users),
    ("POST", "/users", users.create_user),
    ("GET", "/users/{name}", users.show_user),
    ("DELETE", "/users/{name}", users.delete_user),
    ("POST", "/users/{name}/disable", users.disable_user),
    ("POST", "/users/{name}/enable", users.enable_user),
    ("POST", "/users/{name}/password", users.reset_password),
    ("GET", "/groups", groups.list_groups),
    ("POST", "/groups", groups.create_group),
    ("GET", "/groups/{name}", groups.show_group),
    ("DELETE", "/groups/{name}", groups.delete_group),
    ("PUT", "/groups/{name}/members/{user}", groups.add_member),
    ("DELETE", "/groups/{name}/members/{user}", groups.remove_member),
    ("GET", "/credentials", credentials.list_credentials),
    ("POST", "/credentials", credentials.create_credential),
    ("GET", "/credentials/{id}", credentials.show_credential),
    ("PATCH", "/credentials/{id}", credentials.update_credential),
    ("DELETE", "/credentials/{id}", credentials.revoke_credential),
    ("POST", "/credentials/{id}/rotate", credentials.rotate_credential),
    ("GET", "/credentials/{id}/usage", credentials.credential_usage),
    ("GET", "/audit", audit.list_audit),
    ("GET", "/webhooks/deliveries", webhook_views.list_deliveries),
    ("GET", "/users/{name}/webhook", webhook_views.show_webhook),
    ("PUT", "/users/{name}/webhook", webhook_views.set_webhook),
)
# Everything else needs a session or a credential: authentication is the default, not an opt-in.
PUBLIC_HANDLERS: frozenset[Handler] = frozenset({openapi_document, health, session.login})


class SchemaMissing(RuntimeError):
    """The database has not been migrated to the schema this admin service needs."""


def _request_id(request: web.Request) -> str:
    return request_id_text(request.headers.get("X-Request-Id", ""))


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes the JSON error shape; a bug is logged here and never shown to the client."""
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    response: web.StreamResponse
    if is_page(request):  # the web UI answers its own errors as pages (admin.ui.web)
        response = await handler(request)
        response.headers["X-Request-Id"] = request_id
        request.app[SERVICES].metrics.count_request(_route_label(request), request.method, response.status)
        return response
    deadline = request.app[SERVICES].settings.admin.store_timeout
    try:
        # Every wait on the database is bounded: a hung or partitioned Postgres answers 503, never a hang.
        async with asyncio.timeout(deadline):
            response = await handler(request)
    except ApiError as exc:
        response = error_response(exc)
    except LifecycleError as exc:
        response = error_response(ApiError.from_lifecycle(exc))
    except web.HTTPException as exc:
        response = error_response(from_http_exception(exc))
    except hashing.Argon2Busy:
        response = error_response(ApiError(503, "unavailable", "too many verifications in progress; retry shortly",
                                           headers={"Retry-After": "1"}))
    except CONCURRENT_CHANGES as exc:
        logger.warning("concurrent change in %s %s: %s", request.method, _route_label(request), exc.__class__.__name__)
        response = error_response(ApiError(409, "conflict", "the data changed while this request ran; retry it"))
    except TimeoutError:
        logger.warning("%s %s did not finish within %.1f s", request.method, _route_label(request), deadline)
        response = error_response(ApiError(503, "unavailable", "the database did not answer in time; retry shortly",
                                           headers={"Retry-After": "5"}))
    except STORE_UNAVAILABLE as exc:  # 503 (try again), not 500 (our bug)
        logger.warning("database unavailable for %s %s: %s", request.method, _route_label(request),
                       exc.__class__.__name__)
        response = error_response(ApiError(503, "unavailable", "the database is unavailable; retry shortly",
                                           headers={"Retry-After": "5"}))
    except Exception as exc:
        _log_bug(request, request_id, exc)
        response = error_response(ApiError(500, "internal_error", f"internal error; quote request id {request_id}"))
    response.headers["X-Request-Id"] = request_id
    request.app[SERVICES].metrics.count_request(_route_label(request), request.method, response.status)
    return response


def _log_bug(request: web.Request, request_id: str, exc: Exception) -> None:
    """Log an unexpected exception; a database error's text may quote row values (hashes), so only its frames."""
    where = f"{request.method} {_route_label(request)} (request {request_id})"
    if isinstance(exc, asyncpg.PostgresError):
        frames = "".join(traceback.format_tb(exc.__traceback__))
        logger.error("database error %s (sqlstate %s) in %s\n%s", exc.__class__.__name__,
                     getattr(exc, "sqlstate", "?"), where, frames)
    else:
        logger.error("unhandled error in %s", where, exc_info=exc)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if is_page(request) or request.match_info.http_exception is not None or \
            request.match_info.handler in PUBLIC_HANDLERS:
        return await handler(request)
    auth = request.app[SERVICES].auth
    identity = await auth.authenticate(request)
    if identity is None:
        raise unauthorized()
    auth.check_csrf(request, identity)
    request[IDENTITY] = identity
    return await handler(request)


async def _maintain(settings: Settings, pool: store.Pool) -> None:
    while True:
        await asyncio.sleep(MAINTENANCE_SECONDS)
        try:
            async with pool.acquire() as conn:
                await conn.execute(admin_sql.DELETE_EXPIRED_ADMIN_SESSIONS)
                await conn.execute(admin_sql.PRUNE_LOGIN_FAILURES, settings.admin.login_window_seconds)
                await conn.execute(admin_sql.PRUNE_IDEMPOTENCY_KEYS, KEY_LIFETIME)
        except Exception:  # the database may be away for a while; try again next round
            logger.warning("admin maintenance failed", exc_info=True)


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    metrics = AdminMetrics(registry if registry is not None else CollectorRegistry())

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            pool = await database.create_pool(settings.database_url.reveal(), min_size=1,
                                           max_size=settings.database_pool_size,
                                           statement_cache_size=settings.database_statement_cache_size)
            stack.push_async_callback(pool.close)
            async with pool.acquire() as conn:
                if not await conn.fetchval(store.SCHEMA_CHECK):
                    raise SchemaMissing("the database schema is not up to date; run `credgate migrate` first")
            argon2 = hashing.pool_from(settings.argon2)
            stack.push_async_callback(asyncio.to_thread, argon2.close)
            auth = AdminAuth(settings, pool, argon2)
            await auth.start()
            app[SERVICES] = Services(settings, pool, argon2, auth, RotationReplay(pool), metrics)
            audit_check = AuditChainCheck(pool, metrics.audit_chain_ok, settings.audit.verify_seconds)
            for job in (metrics.refresh_forever(pool), _maintain(settings, pool), audit_check.run_forever()):
                stack.push_async_callback(_cancel, asyncio.get_running_loop().create_task(job))
            worker = DeliveryWorker(settings.webhooks, pool, settings.database_url.reveal(), metrics)
            stack.push_async_callback(_cancel, asyncio.get_running_loop().create_task(worker.run()))
            yield

    app = web.Application(client_max_size=settings.admin.max_body_bytes,
                          middlewares=[errors_middleware, pages_middleware, auth_middleware])
    app.cleanup_ctx.append(resources)
    for method, path, handler in ROUTES:
        app.router.add_route(method, API + path, handler)
    setup_ui(app)
    return app


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
