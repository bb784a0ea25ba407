"""flowrunner: YAML flows of HTTP steps, on schedules and webhooks, with credentials kept alive."""

__version__ = "0.1.0"
