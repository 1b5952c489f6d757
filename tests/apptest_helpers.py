"""Small helpers shared by the AppTest suites: read a page run's outcome, press a button."""

from __future__ import annotations


def clean(at) -> None:
    """The run raised no exception (an exception box would be a crash the user sees)."""
    assert not at.exception, [e.message for e in at.exception]


def click(at, label: str):
    """Press the one button labelled ``label`` and rerun."""
    [button] = [b for b in at.button if b.label == label]
    return button.click().run()


def headings(at) -> list[str]:
    return [s.value for s in at.subheader]


def errors(at) -> list[str]:
    return [e.value for e in at.error]
