"""Placeholder: being written (issue 18)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise SystemExit("jdm_fast.convert: this subcommand is not written yet")
