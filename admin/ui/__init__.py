"""The web UI of the admin service: server-rendered pages at `/` over the same lifecycle as the JSON API."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from admin.ui import credentials, manage, signin

HERE = Path(__file__).parent


def setup_ui(app: web.Application) -> None:
    """Templates (autoescaped), static files, and every page's route."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )
    env.globals["badge_class"] = credentials.badge_class
    env.globals["static"] = _static_urls()
    app.router.add_static("/static/", HERE / "static")
    for module in (signin, credentials, manage):
        module.add_routes(app.router)


def _static_urls() -> Callable[[str], str]:
    """`static('app.css')` → `/static/app.css?v=<content hash>`: a changed file is never served from a cache."""
    versions = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (HERE / "static").iterdir()}

    def url(name: str) -> str:
        return f"/static/{name}?v={versions[name]}"

    return url
