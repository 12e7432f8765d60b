"""Settings: parsed from a passed-in environment, every error reported at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edge.__main__ import TABLE_BEGIN, TABLE_END
from edge.settings import (
    MemoryLimit,
    SettingsError,
    check_declarations,
    defaults,
    load_settings,
    reference_table,
)
from tests.conftest import REPO


def test_every_field_is_declared_once() -> None:
    check_declarations()


def test_defaults_serve_the_bundled_samples() -> None:
    settings = defaults()
    assert settings.origin_url.startswith("file://")
    assert settings.origin_url.endswith("/edge/samples")
    assert settings.backend_timeout == 10
    assert settings.memory_limit == MemoryLimit(percent=75)
    assert settings.cache == ("memory",)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("EDGE_MEMORY_LIMIT", "2GiB", MemoryLimit(bytes=2 * 1024**3)),
        ("EDGE_MEMORY_LIMIT", "60%", MemoryLimit(percent=60)),
        ("EDGE_CACHE", "none", ()),
        ("EDGE_CACHE", "memory,redis://127.0.0.1:6379/0", ("memory", "redis://127.0.0.1:6379/0")),
        ("EDGE_ALLOWED_INPUT_FORMATS", "jpg,PNG", frozenset({"jpeg", "png"})),
        ("EDGE_AUTO_FORMAT", "TRUE", True),
    ],
)
def test_values_parse(name: str, value: str, expected: object) -> None:
    settings = load_settings({name: value})
    assert getattr(settings, name.removeprefix("EDGE_").lower()) == expected


def test_all_bad_values_are_reported_together() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            {
                "EDGE_PORT": "eighty",
                "EDGE_BACKEND_TIMEOUT": "-1",
                "EDGE_ORIGIN": "ftp://x",
                "EDGE_IMAGE_PARAM_VALIDATIONS": "{not json",
                "EDGE_TYPO": "1",
            }
        )
    problems = "\n".join(caught.value.problems)
    for name in (
        "EDGE_PORT",
        "EDGE_BACKEND_TIMEOUT",
        "EDGE_ORIGIN",
        "EDGE_IMAGE_PARAM_VALIDATIONS",
        "EDGE_TYPO",
    ):
        assert name in problems
    assert "expected an integer" in problems


def test_the_cli_exits_non_zero_without_a_traceback() -> None:
    env = {**os.environ, "EDGE_PORT": "x", "EDGE_CACHE": "bogus"}
    result = subprocess.run(
        [sys.executable, "-m", "edge"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "EDGE_PORT" in result.stderr
    assert "EDGE_CACHE" in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_table_is_current() -> None:
    readme = (REPO / "README.md").read_text()
    begin, end = readme.index(TABLE_BEGIN), readme.index(TABLE_END)
    shown = readme[begin + len(TABLE_BEGIN) : end].strip()
    assert shown == reference_table().strip(), "run `make readme` to regenerate the table"
