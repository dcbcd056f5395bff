"""
README.rst is cim's page for its users and its package's long description
(setup.cfg): it must render as reStructuredText without a warning.
"""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core
import docutils.utils

README = Path(__file__).resolve().parent.parent / "README.rst"


def problems(text: str) -> list[str]:
    """
    What docutils reports of C{text} at warning level or above (C{[]}: it
    renders cleanly).
    """
    stream = io.StringIO()
    try:
        docutils.core.publish_doctree(
            text,
            settings_overrides={
                "halt_level": 5,
                "report_level": 2,
                "warning_stream": stream,
            },
        )
    except docutils.utils.SystemMessage as e:
        return [str(e)]
    return [line for line in stream.getvalue().splitlines() if line]


def test_the_readme_renders_without_a_warning() -> None:
    assert problems(README.read_text(encoding="utf-8")) == []


def test_a_broken_document_is_reported() -> None:
    # (The check above would say nothing of a README it could not read.)
    assert problems("An ``unclosed literal.\n")
    assert problems("A list:\n\n* item\ntext right after it\n")
    assert problems("Fine\n====\n\ntext\n") == []
