"""The route table: longest-prefix matching on the normalised path, and the target sent upstream."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.core.route_config import Route

__all__ = ["RouteTable", "upstream_path"]


class RouteTable:
    """Longest-prefix route lookup on whole segments: "/api" matches "/api", "/api/x", never "/apix"."""

    __slots__ = ("_by_key", "_key_lengths", "_longest", "_root", "routes")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self._by_key: dict[bytes, Route] = {}
        for route in self.routes:
            if route.match_key in self._by_key:
                raise ValueError(f"route prefix {route.match_key.decode()!r} is defined twice")
            self._by_key[route.match_key] = route
        self._root = self._by_key.get(b"/")
        self._key_lengths = frozenset(len(key) for key in self._by_key)
        self._longest = max(self._key_lengths, default=0)

    def match(self, path: bytes) -> Route | None:
        """Return the route for a normalised path (from normalize_target), or None when none matches."""
        get = self._by_key.get
        lengths = self._key_lengths
        if len(path) in lengths:
            route = get(path)
            if route is not None:
                return route
        # No key is longer than _longest, so start at the last segment boundary within reach; only
        # slice (and allocate) candidates whose length some key has.
        end = path.rfind(b"/", 0, self._longest + 1)
        while end > 0:
            if end in lengths:
                route = get(path[:end])
                if route is not None:
                    return route
            end = path.rfind(b"/", 0, end)
        return self._root


def upstream_path(route: Route, path: bytes, query: bytes) -> bytes:
    """Build the upstream request target: strip the prefix if asked, prepend the upstream's base path.

    `path` must be the normalised path that `route` matched; the result always starts with "/".
    """
    if route.strip_prefix and route.match_key != b"/":
        path = path[len(route.match_key) :]
    base = route.upstream.base_path_bytes
    if base:
        return base + path + query
    if not path:
        return b"/" + query
    return path + query
