"""The `run` fixture: each socket-level scenario runs on asyncio and on uvloop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway.http.support import LOOPS, Run, loop_runner


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    with loop_runner(request.param) as run_scenario:
        yield run_scenario
