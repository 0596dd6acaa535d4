"""The web console at /ui: the registry's providers, models, tokens, usage and audit log, for people
in a browser. Each module registers its pages on the one blueprint, ui_bp."""

from ui import account, audit, catalog, providers, tokens, usage  # noqa: F401 (their pages)
from ui.console import ui_bp

__all__ = ["ui_bp"]
