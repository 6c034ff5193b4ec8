"""Secret references in flow files: `${env:NAME}` and `${file:/path}`, resolved only when used."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

SECRET_REF = re.compile(r"\$\{(env|file):([^}]+)\}")
_MIN_SECRET = 4  # masking very short strings would mangle ordinary text

# Every secret value resolved in this process, whoever resolved it (a template, a signature
# config, a Kafka cluster): the redactor masks them all, so no kind can forget to register one.
_RESOLVED: set[str] = set()


def register_secret(value: str) -> None:
    """Have `value` masked wherever hopwatch redacts (results, store, API, logs)."""
    if len(value) >= _MIN_SECRET:
        _RESOLVED.add(value)


def resolved_secrets() -> set[str]:
    """Every secret value registered so far (the live set: read it, never change it)."""
    return _RESOLVED


class SecretUnavailable(Exception):
    """The secret reference could not be resolved: our configuration's fault, not the target's."""


def resolve_secret(ref: str | SecretStr, on_value: Callable[[str], None] | None = None) -> str:
    """`ref` with every reference replaced; `on_value` sees each resolved value (for redaction).

    Raises SecretUnavailable naming the reference, never a value.
    """
    text = ref.get_secret_value() if isinstance(ref, SecretStr) else ref
    if "${" not in text:  # a literal: nothing to resolve (this runs on every webhook)
        if isinstance(ref, SecretStr) and text not in _RESOLVED:
            register_secret(text)  # a secret field written literally is a secret all the same
        return text

    def value(match: re.Match[str]) -> str:
        source, name = match.group(1), match.group(2).strip()
        if source == "env":
            if name not in os.environ:
                raise SecretUnavailable(f"environment variable {name} is not set")
            resolved = os.environ[name]
        else:
            try:
                resolved = Path(name).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SecretUnavailable(f"secret file {name}: {exc.strerror}") from exc
        register_secret(resolved)
        if on_value is not None:
            on_value(resolved)
        return resolved

    return SECRET_REF.sub(value, text)
