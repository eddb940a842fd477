"""Administrator pages: users and service accounts, groups, API accounts for a group, and the audit log."""

from __future__ import annotations

from aiohttp import web

from admin.ui import manage_api_accounts, manage_audit, manage_groups, manage_users


def add_routes(router: web.UrlDispatcher) -> None:
    for module in (manage_users, manage_groups, manage_api_accounts, manage_audit):
        module.add_routes(router)
