"""Stand-in for `google.colab.output`: widget-manager switches and output helpers are no-ops."""

from __future__ import annotations

from google.colab._log import record


def enable_custom_widget_manager() -> None:
    record("output.enable_custom_widget_manager")


def disable_custom_widget_manager() -> None:
    record("output.disable_custom_widget_manager")


def clear(wait: bool = False, output_tags=()) -> None:
    record("output.clear")


def register_callback(function_name: str, callback) -> None:
    record("output.register_callback", name=function_name)


def eval_js(script: str, ignore_result: bool = False, timeout_sec=None):
    """Colab runs JavaScript in the browser; there is no browser here."""
    record("output.eval_js")
    raise RuntimeError("google.colab.output.eval_js needs Colab's browser front end (rehearsal stand-in)")
