"""Typed records other rooms exchange: report.json as `ProfileReport` (written by bench, read by report, roi and
compare). It sits below all of them and imports only util and errors, so each can import it."""

from optcli.schema.report import ProfileReport

__all__ = ["ProfileReport"]
