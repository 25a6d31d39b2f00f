"""All configuration in one typed place: each setting is written once, in this package (services.py: manager
and router; worker.py; access.py: credentials, Ray services, the `svllm` command), imported from here.

A setting is a field of one settings model per component (ManagerSettings, RouterSettings, WorkerSettings,
AuthSettings, RaySettings for `svllm ray-services`, CliSettings for the `svllm` command itself) with its type, its
default, its environment variable (the field's `validation_alias`: MANAGER_URL, WORKER_ID, PUBLIC_URL, ...) and a
one-line `description`. The command line (cli.py, ray_mode/cli.py) derives each flag's default and help from the
field (`add_flag`), and tests/unit/test_settings.py checks the README's table and `.env.example` against these
models. Settings objects are immutable and passed to the objects that need them.

`XSettings.from_env(**overrides)` reads the environment when it is called (never at import); overrides that are
None are ignored, so unset flags fall back to the environment, then to the default. An empty variable counts as
unset. Only the variables named here are read, and their values are parsed as documented per field (no JSON).
Constructing a model directly (`ManagerSettings(db_path=..., heartbeat_timeout_s=30)`) takes the values given and
the defaults only, never the environment: what a test or a Serve replica passes is what it gets.
"""

from ..settings_base import Settings
from .access import AuthSettings, CliSettings, RaySettings
from .services import ManagerSettings, RouterSettings
from .worker import WorkerSettings

__all__ = [
    "SETTINGS_MODELS",
    "AuthSettings",
    "CliSettings",
    "ManagerSettings",
    "RaySettings",
    "RouterSettings",
    "WorkerSettings",
]

# Every settings model (tests/unit/test_settings.py checks the README's table and .env.example against them).
SETTINGS_MODELS: tuple[type[Settings], ...] = (
    ManagerSettings,
    RouterSettings,
    WorkerSettings,
    AuthSettings,
    RaySettings,
    CliSettings,
)
