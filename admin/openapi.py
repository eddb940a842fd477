"""The OpenAPI 3.1 document of the admin API, served at /api/v1/openapi.json; tests hold the server to it."""

from __future__ import annotations

import functools
from typing import Any

from gateway.core.rate_policy import QUOTA_PATTERN, RATE_PATTERN

Schema = dict[str, Any]

PRINCIPAL_NAME = "^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
GROUP_NAME = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
PUBLIC_ID = "^[0-9A-Za-z]{12}$"


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Schema], required: tuple[str, ...] | None = None) -> Schema:
    """A closed object; every property is required unless `required` lists fewer."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": list(properties if required is None else required)}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


STRING: Schema = {"type": "string"}
TIME: Schema = {"type": "string", "format": "date-time"}
BOOL: Schema = {"type": "boolean"}
INT: Schema = {"type": "integer"}


def page_of(item: str) -> Schema:
    return obj({"items": {"type": "array", "items": ref(item)},
                "next_cursor": nullable({"type": "string", "description": "pass as ?cursor= for the next page"})})


USER: dict[str, Schema] = {
    "id": INT, "name": STRING, "kind": {"enum": ["user", "service"]}, "is_admin": BOOL, "disabled": BOOL,
    "created_at": TIME, "groups": {"type": "array", "items": STRING},
}
CREDENTIAL: dict[str, Schema] = {
    "id": {"type": "string", "pattern": PUBLIC_ID, "description": "public id; also the token's id"},
    "kind": {"enum": ["token", "key"]}, "name": STRING, "owner": STRING,
    "created_by": STRING, "created_at": TIME, "expires_at": nullable(TIME), "revoked_at": nullable(TIME),
    "last_used_at": nullable(TIME), "rotated_at": nullable(TIME),
    "previous_secret_expires_at": nullable({**TIME, "description": "the old secret works until then"}),
    "status": {"enum": ["valid", "expired", "suspended", "revoked"]},
    "rate_limit": nullable({"type": "string", "pattern": RATE_PATTERN,
                            "description": "requests per second, minute or hour; null: no rate limit"}),
    "quota": nullable({"type": "string", "pattern": QUOTA_PATTERN,
                       "description": "requests per calendar day or month (UTC); null: no quota"}),
    "client_id": {"type": "string", "description": "key pairs only: the access key / Basic user name"},
    "legacy": {"type": "boolean", "description": "an imported key, still in its old format; rotate it to get a "
                                                 "credgate-format secret with the same id"},
    "revocation_reason": nullable({"enum": ["exposed"], "description": "exposed: reported leaked, revoked at once"}),
    "exposed_url": nullable({"type": "string", "description": "where the leaked secret was found"}),
    "status_label": {"type": "string", "description": "status as shown to people, e.g. \"revoked (exposed)\""},
}
CREDENTIAL_REQUIRED = tuple(k for k in CREDENTIAL if k != "client_id")
# Requests may also send "none" (like null: no limit); the admin role is needed to change either.
LIMITS: dict[str, Schema] = {
    "rate_limit": {"anyOf": [{"type": "string", "pattern": RATE_PATTERN}, {"const": "none"}, {"type": "null"}],
                   "description": "N/second, N/minute or N/hour, e.g. 100/minute; null or \"none\": no rate limit "
                                  "(admins only)", "examples": ["100/minute"]},
    "quota": {"anyOf": [{"type": "string", "pattern": QUOTA_PATTERN}, {"const": "none"}, {"type": "null"}],
              "description": "N/day or N/month, e.g. 100000/month; null or \"none\": no quota (admins only)",
              "examples": ["100000/month"]},
}
EXPIRY_DAYS: Schema = {"oneOf": [{"type": "integer", "minimum": 1}, {"const": "never"}],
               "description": "lifetime in days, or \"never\" when the policy allows it"}

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": {"type": "string", "description": "machine-readable code"}, "message": STRING,
                  "fields": {"type": "object", "additionalProperties": STRING,
                             "description": "per request field: what is wrong with it"}}),
    "User": obj(USER),
    "UserCreated": obj({**USER, "password": {"type": "string", "description": "generated password, shown once"}},
                       tuple(USER)),
    "UserCreate": obj({"name": {"type": "string", "pattern": PRINCIPAL_NAME},
                       "kind": {"enum": ["user", "service"], "default": "user"},
                       "is_admin": {"type": "boolean", "default": False},
                       "groups": {"type": "array", "items": {"type": "string", "pattern": GROUP_NAME},
                                  "maxItems": 100},
                       "password": {"type": "string", "minLength": 12, "maxLength": 1024,
                                    "description": "users only; generated and returned once when omitted"}},
                      ("name",)),
    "UserPage": page_of("User"),
    "PasswordReset": obj({"name": STRING, "password": {"type": "string", "description": "shown once"}}),
    "Group": obj({"id": INT, "name": STRING, "description": STRING, "created_at": TIME,
                  "members": {"type": "array", "items": STRING}}),
    "GroupCreate": obj({"name": {"type": "string", "pattern": GROUP_NAME},
                        "description": {"type": "string", "maxLength": 500}}, ("name",)),
    "GroupPage": page_of("Group"),
    "Credential": obj(CREDENTIAL, CREDENTIAL_REQUIRED),
    "CredentialIssued": obj({**CREDENTIAL, "token": {"type": "string", "description": "tokens: shown once"},
                             "secret": {"type": "string", "description": "key pairs: shown once"}},
                            CREDENTIAL_REQUIRED),
    "CredentialPage": page_of("Credential"),
    "CredentialCreate": obj({"kind": {"enum": ["token", "key"]}, "name": {"type": "string", "maxLength": 200},
                             "owner": {"type": "string", "maxLength": 128,
                                       "description": "admins only; default: the caller"},
                             "expires_at": TIME, "expires_in_days": EXPIRY_DAYS, **LIMITS}, ("kind",)),
    "CredentialUpdate": obj({"name": {"type": "string", "maxLength": 200},
                             "owner": {"type": "string", "maxLength": 128, "description": "admins only"},
                             "expires_at": TIME, "expires_in_days": EXPIRY_DAYS, **LIMITS}, ()),
    "Rotate": obj({"grace_seconds": {"type": "integer", "minimum": 0, "maximum": 604800, "default": 0,
                                     "description": "how long the old secret keeps working"}}, ()),
    "Usage": obj({"id": STRING, "last_used_at": nullable(TIME), "since": {"type": "string", "format": "date"},
                  "days": {"type": "array", "items": obj({"day": {"type": "string", "format": "date"},
                                                          "requests": INT})},
                  "total_requests": INT}),
    "AuditEvent": obj({"id": INT, "at": TIME, "actor": STRING, "actor_id": nullable(INT), "auth_method": STRING,
                       "action": STRING, "target_type": STRING, "target": STRING,
                       "changes": {"type": "object", "description": "changed fields, before and after; no secrets"},
                       "request_id": STRING, "source": STRING}),
    "AuditPage": page_of("AuditEvent"),
    "SessionCreate": obj({"username": {"type": "string", "minLength": 1, "maxLength": 128},
                          "password": {"type": "string", "minLength": 1, "maxLength": 1024}}),
    "Session": obj({"user": ref("User"), "auth_method": {"enum": ["session", "bearer", "basic", "headers"]},
                    "csrf_token": nullable({"type": "string", "description": "send as X-CSRF-Token"}),
                    "expires_at": nullable(TIME), "credential_id": nullable(STRING)}),
    "PasswordChange": obj({"current_password": {"type": "string", "minLength": 1, "maxLength": 1024},
                           "new_password": {"type": "string", "minLength": 12, "maxLength": 1024}}),
    "Health": obj({"status": {"const": "ok"}}),
    "WebhookDelivery": obj({
        "id": INT, "event_id": {"type": "string", "format": "uuid", "description": "the Credgate-Webhook-Id"},
        "type": STRING, "url": {"type": "string", "description": "the destination (any password shown as ***)"},
        "status": {"enum": ["pending", "delivered", "failed"]}, "attempts": INT, "next_attempt_at": TIME,
        "last_status": nullable({"type": "integer", "description": "the receiver's last HTTP status"}),
        "last_error": STRING, "created_at": TIME, "finished_at": nullable(TIME), "credential": nullable(STRING)}),
    "WebhookDeliveryPage": page_of("WebhookDelivery"),
    "OwnerWebhook": obj({"name": STRING, "webhook_url": nullable(STRING)}),
    "OwnerWebhookUpdate": obj({"webhook_url": nullable({
        "type": "string", "pattern": "^https?://", "maxLength": 2000,
        "description": "gets the lifecycle events of this owner's credentials; null clears it"})}),
}

REQUEST_ID_HEADER = {"X-Request-Id": {"schema": STRING, "description": "the request id, also in the audit trail"}}
ERROR_TEXT = {
    400: "Invalid request: malformed JSON or invalid fields (see `fields`)",
    401: "No valid session or credential (the same answer for an unknown user and a wrong password)",
    403: "Authenticated but not allowed (not an admin, or a missing/wrong X-CSRF-Token with a session)",
    404: "Not found, or not yours to see",
    409: "Conflicts with the current state",
    413: "Request body over admin.max_body_bytes",
    429: "Too many failed logins; see Retry-After",
    503: "The database or the hashing pool is busy or unavailable; see Retry-After",
}


def error(status: int) -> Schema:
    headers = dict(REQUEST_ID_HEADER)
    if status in (429, 503):
        headers["Retry-After"] = {"schema": STRING, "description": "seconds to wait"}
    return {"description": ERROR_TEXT[status], "headers": headers,
            "content": {"application/json": {"schema": ref("Error")}}}


def ok(status: int, description: str, schema: str | None = None, headers: dict[str, Schema] | None = None) -> Schema:
    response: Schema = {"description": description, "headers": {**REQUEST_ID_HEADER, **(headers or {})}}
    if schema is not None:
        response["content"] = {"application/json": {"schema": ref(schema)}}
    return response


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def path(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


PAGING = [query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "page size"),
          query("cursor", STRING, "next_cursor of the previous page")]
NAME = path("name", {"type": "string", "minLength": 1, "maxLength": 128})
CRED_ID = path("id", {"type": "string", "pattern": PUBLIC_ID})


def operation(summary: str, success: Schema, errors: tuple[int, ...], *, body: str | None = None,
              body_required: bool = True, params: list[Schema] | None = None, public: bool = False,
              tag: str = "") -> Schema:
    """One operation; every authenticated one may also answer 401, 413 (with a body) and 503."""
    codes = set(errors) | ({400, 401, 503} if not public else {503})
    if body is not None:
        codes |= {400, 413}
    op: Schema = {"summary": summary, "tags": [tag] if tag else [], "responses": {
        **success, **{str(code): error(code) for code in sorted(codes)}}}
    if body is not None:
        op["requestBody"] = {"required": body_required,
                             "content": {"application/json": {"schema": ref(body)}}}
    if params:
        op["parameters"] = params
    if public:
        op["security"] = []
    return op


def _paths() -> dict[str, Any]:
    """Every authenticated change may also meet a concurrent change of the same rows: 409, retry."""
    paths = _operations()
    for item in paths.values():
        for method, op in item.items():
            if method not in ("get", "parameters") and op.get("security") != []:
                op["responses"].setdefault("409", error(409))
                op["responses"] = dict(sorted(op["responses"].items()))
    return paths


def _operations() -> dict[str, Any]:
    admin = (403,)
    return {
        "/api/v1/openapi.json": {"get": operation("This document", {"200": {
            "description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}, (),
            public=True, tag="meta")},
        "/api/v1/health": {"get": operation("Liveness and database reachability",
                                            {"200": ok(200, "Healthy", "Health")}, (), public=True, tag="meta")},
        "/api/v1/session": {
            "post": operation("Log in with username and password; sets the credgate_session cookie", {
                "200": ok(200, "Logged in", "Session", {"Set-Cookie": {
                    "schema": STRING, "description": "credgate_session; HttpOnly; SameSite=Strict; Secure on TLS"}})},
                (401, 429), body="SessionCreate", public=True, tag="session"),
            "get": operation("Who is calling (and the CSRF token of a cookie session)",
                             {"200": ok(200, "The caller", "Session")}, (), tag="session"),
            "delete": operation("Log out: the session ends server-side", {"204": ok(204, "Logged out")},
                                (400, 403), tag="session"),
        },
        "/api/v1/me/password": {"put": operation(
            "Change your own password (the current one is required; your other sessions end)",
            {"204": ok(204, "Changed")}, (403, 429), body="PasswordChange", tag="session")},
        "/api/v1/users": {
            "get": operation("List users and service accounts", {"200": ok(200, "A page", "UserPage")},
                             (400, *admin), params=[query("kind", {"enum": ["user", "service"]}, "filter"), *PAGING],
                             tag="users"),
            "post": operation("Create a user (password generated and shown once unless given) or service account",
                              {"201": ok(201, "Created", "UserCreated")}, (*admin, 404, 409), body="UserCreate",
                              tag="users"),
        },
        "/api/v1/users/{name}": {
            "parameters": [NAME],
            "get": operation("Show a user", {"200": ok(200, "The user", "User")}, (*admin, 404), tag="users"),
            "delete": operation("Delete a user: their credentials are revoked", {"204": ok(204, "Deleted")},
                                (*admin, 404, 409), tag="users"),
        },
        "/api/v1/users/{name}/disable": {"parameters": [NAME], "post": operation(
            "Disable: their credentials read suspended at once", {"200": ok(200, "Disabled", "User")},
            (*admin, 404, 409), tag="users")},
        "/api/v1/users/{name}/enable": {"parameters": [NAME], "post": operation(
            "Enable again", {"200": ok(200, "Enabled", "User")}, (*admin, 404), tag="users")},
        "/api/v1/users/{name}/password": {"parameters": [NAME], "post": operation(
            "Reset an interactive user's password (new one shown once; their sessions end)",
            {"200": ok(200, "New password", "PasswordReset")}, (400, *admin, 404, 409), tag="users")},
        "/api/v1/groups": {
            "get": operation("List permission groups", {"200": ok(200, "A page", "GroupPage")}, (400, *admin),
                             params=PAGING, tag="groups"),
            "post": operation("Create a group", {"201": ok(201, "Created", "Group")}, (*admin, 409),
                              body="GroupCreate", tag="groups"),
        },
        "/api/v1/groups/{name}": {
            "parameters": [NAME],
            "get": operation("Show a group", {"200": ok(200, "The group", "Group")}, (*admin, 404), tag="groups"),
            "delete": operation("Delete a group", {"204": ok(204, "Deleted")}, (*admin, 404), tag="groups"),
        },
        "/api/v1/groups/{name}/members/{user}": {
            "parameters": [NAME, path("user", {"type": "string", "minLength": 1, "maxLength": 128})],
            "put": operation("Add a member (idempotent)", {"204": ok(204, "Member")}, (*admin, 404), tag="groups"),
            "delete": operation("Remove a member (idempotent)", {"204": ok(204, "Not a member")}, (*admin, 404),
                                tag="groups"),
        },
        "/api/v1/credentials": {
            "get": operation("List credentials (self-service callers see their own)",
                             {"200": ok(200, "A page", "CredentialPage")}, (400, 403), params=[
                                 query("owner", STRING, "owner name (admins; others may give only themselves)"),
                                 query("status", {"enum": ["valid", "expired", "suspended", "revoked"]}, "filter"),
                                 query("kind", {"enum": ["token", "key"]}, "filter"),
                                 query("expiring_before", TIME, "expires before this time"), *PAGING],
                             tag="credentials"),
            "post": operation("Create a credential; the secret is in this response only",
                              {"201": ok(201, "Created", "CredentialIssued")}, (403, 404), body="CredentialCreate",
                              tag="credentials"),
        },
        "/api/v1/credentials/{id}": {
            "parameters": [CRED_ID],
            "get": operation("Show a credential", {"200": ok(200, "The credential", "Credential")}, (404,),
                             tag="credentials"),
            "patch": operation("Rename, change expiry or (admins) owner, rate limit and quota",
                               {"200": ok(200, "Updated", "Credential")},
                               (403, 404, 409), body="CredentialUpdate", tag="credentials"),
            "delete": operation("Revoke (irreversible; stays listed as revoked)", {"204": ok(204, "Revoked")},
                                (403, 404), tag="credentials"),
        },
        "/api/v1/credentials/{id}/rotate": {
            "parameters": [CRED_ID, {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {
                "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
                "description": "a retry with the same key within 24 h returns the first response"}],
            "post": operation("New secret, same id; the old one stops now or after grace_seconds", {
                "200": ok(200, "Rotated; the new secret is in this response only", "CredentialIssued",
                          {"Idempotent-Replayed": {"schema": {"const": "true"},
                                                   "description": "present on a replayed response"}})},
                (403, 404, 409), body="Rotate", body_required=False, tag="credentials"),
        },
        "/api/v1/credentials/{id}/usage": {"parameters": [CRED_ID], "get": operation(
            "Last use and requests per day", {"200": ok(200, "Usage", "Usage")}, (400, 404), params=[
                query("days", {"type": "integer", "minimum": 1, "maximum": 366, "default": 30}, "how many days")],
            tag="credentials")},
        "/api/v1/audit": {"get": operation("The audit trail, newest first", {"200": ok(200, "A page", "AuditPage")},
                                           (400, *admin), params=[
            query("actor", STRING, "actor label (principal name, or cli:<os user>)"),
            query("target", STRING, "target name or credential id"),
            query("action", STRING, "e.g. credential.rotate"),
            query("since", TIME, "at or after"), query("until", TIME, "before"), *PAGING], tag="audit")},
        "/api/v1/webhooks/deliveries": {"get": operation(
            "Lifecycle-event webhook deliveries, newest first", {"200": ok(200, "A page", "WebhookDeliveryPage")},
            (400, *admin), params=[query("status", {"enum": ["pending", "delivered", "failed"]}, "filter"), *PAGING],
            tag="webhooks")},
        "/api/v1/users/{name}/webhook": {
            "parameters": [NAME],
            "get": operation("A user's own webhook URL", {"200": ok(200, "The URL", "OwnerWebhook")}, (*admin, 404),
                             tag="webhooks"),
            "put": operation("Set or clear a user's own webhook URL", {"200": ok(200, "Set", "OwnerWebhook")},
                             (*admin, 404), body="OwnerWebhookUpdate", tag="webhooks"),
        },
    }


def security_schemes(access_key_header: str, secret_key_header: str) -> dict[str, Schema]:
    return {
        "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "credgate_session",
                          "description": "from POST /api/v1/session; state-changing calls also need csrfToken"},
        "csrfToken": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
                      "description": "the csrf_token of the session (required on POST, PUT, PATCH, DELETE)"},
        "bearer": {"type": "http", "scheme": "bearer", "description": "a credgate token; acts as its owner"},
        "basic": {"type": "http", "scheme": "basic", "description": "a key pair's client_id:secret"},
        "accessKey": {"type": "apiKey", "in": "header", "name": access_key_header,
                      "description": "a key pair's client_id"},
        "secretKey": {"type": "apiKey", "in": "header", "name": secret_key_header,
                      "description": "a key pair's secret"},
    }


@functools.cache
def document(access_key_header: str = "accessKey",
             secret_key_header: str = "secretKey") -> dict[str, Any]:  # noqa: S107 - a header name
    """The document; the key-pair header names follow gateway.access_key_header / secret_key_header."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "credgate admin API", "version": "1",
                 "description": "Users, service accounts, groups, credentials and the audit trail. Admins may do "
                                "everything; other callers manage only their own credentials. Every error is "
                                "JSON {error, message, fields}."},
        "servers": [{"url": "/"}],
        "security": [{"sessionCookie": [], "csrfToken": []}, {"bearer": []}, {"basic": []},
                     {"accessKey": [], "secretKey": []}],
        "paths": _paths(),
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": security_schemes(access_key_header, secret_key_header)},
    }
