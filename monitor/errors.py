"""Engine-side errors: our bugs and bad configs, never counted against the system under watch."""

from probes.errors import ConfigError, TemplateError

__all__ = ["ConfigError", "TemplateError"]
