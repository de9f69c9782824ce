"""Web pages under ``/ui`` (server-rendered Jinja2, no front-end build): see ``service.ui.routes``."""

from service.ui.routes import install_ui, router

__all__ = ["install_ui", "router"]
