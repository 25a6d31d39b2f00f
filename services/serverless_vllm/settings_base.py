"""The machinery of the settings models (config/): one field = default, environment variable, description.

`Settings.from_env(**overrides)` reads the environment when it is called (never at import); overrides that are
None are ignored, so unset flags fall back to the environment, then to the default. An empty variable counts as
unset. Only the variables named by the fields are read, and their values are parsed by the fields' validators (no
JSON). Constructing a model directly takes the values given and the defaults only, never the environment.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Self

from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

# Set by from_env while it constructs: only then is the environment a settings source.
_READ_ENV: ContextVar[bool] = ContextVar("serverless_vllm_settings_read_env", default=False)


TRUTHY = ("1", "true", "yes", "on")


def truthy(value: Any) -> Any:
    """A switch written as text (1/true/yes/on, any case) as a bool; anything else as it is."""
    return value.strip().lower() in TRUTHY if isinstance(value, str) else value


def env_value(name: str, default: Any) -> Any:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value


def default_state_dir() -> Path:
    return Path(env_value("SVLLM_STATE_DIR", Path.home() / ".cache" / "serverless-vllm"))


class _RawEnvSource(EnvSettingsSource):
    """The environment: each field's own variable only (not its name, which populate_by_name would add), passed on
    as the string it is: no JSON decoding of list fields (the fields' validators split them as documented)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        name = field.validation_alias
        if not isinstance(name, str):
            raise TypeError(f"setting {field_name} has no environment variable")
        return self.env_vars.get(name), name, self.field_is_complex(field)

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,  # constructed by field name in code, read by alias (the env variable) from the env
        case_sensitive=True,  # MANAGER_PORT, not manager_port
        env_ignore_empty=True,  # an empty variable is unset: the default applies
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Values given win over the environment; no .env file or secrets directory is read.
        return (init_settings, _RawEnvSource(settings_cls)) if _READ_ENV.get() else (init_settings,)

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """The settings from the environment; overrides (by field name) that are not None win over it."""
        given = {env_name(cls, name) if name in cls.model_fields else name: v for name, v in overrides.items()}
        token = _READ_ENV.set(True)
        try:
            return cls(**{k: v for k, v in given.items() if v is not None})
        finally:
            _READ_ENV.reset(token)

    def to_env(self, *fields: str) -> dict[str, str]:
        """These (scalar) fields as environment variables, for a child process that calls from_env."""
        return {env_name(type(self), f): str(getattr(self, f)) for f in fields}


def env_name(model: type[BaseSettings], field: str) -> str:
    alias = model.model_fields[field].validation_alias
    if not isinstance(alias, str):
        raise TypeError(f"{model.__name__}.{field} has no environment variable")
    return alias


def setting(default: Any = None, *, env: str, description: str, **kwargs: Any) -> Any:
    """A settings field: its default (or default_factory), environment variable and one-line meaning."""
    if "default_factory" in kwargs:
        return Field(validation_alias=env, description=description, **kwargs)
    return Field(default, validation_alias=env, description=description, **kwargs)
