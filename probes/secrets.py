"""Secret references in flow files: `${env:NAME}` and `${file:/path}`, resolved only when used."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

SECRET_REF = re.compile(r"\$\{(env|file):([^}]+)\}")


class SecretUnavailable(Exception):
    """The secret reference could not be resolved: our configuration's fault, not the target's."""


def resolve_secret(ref: str | SecretStr, on_value: Callable[[str], None] | None = None) -> str:
    """`ref` with every reference replaced; `on_value` sees each resolved value (for redaction).

    Raises SecretUnavailable naming the reference, never a value.
    """
    text = ref.get_secret_value() if isinstance(ref, SecretStr) else ref
    if "${" not in text:  # a literal: nothing to resolve (this runs on every webhook)
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
        if on_value is not None:
            on_value(resolved)
        return resolved

    return SECRET_REF.sub(value, text)
