"""Each setting is written once, in config/: the README's table, `.env.example` and the command line follow it."""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings
from serverless_vllm import cli, cli_flags, cli_models, cli_status, config, settings_base
from serverless_vllm.config import (
    AuthSettings,
    CliSettings,
    ManagerSettings,
    RaySettings,
    RouterSettings,
    WorkerSettings,
    access,
    services,
    worker,
)
from serverless_vllm.ray_mode import cli as ray_cli
from serverless_vllm.schemas import FleetStatus

ROOT = Path(__file__).resolve().parents[2]
STATE = "~/.cache/serverless-vllm"

MODELS: tuple[type[BaseSettings], ...] = config.SETTINGS_MODELS

# Variables the Compose files use that are no setting of the services: images, published ports and their bind
# addresses, shared memory, replica counts, the `init` service's model, other programs' variables (vLLM, Hugging
# Face, NVIDIA, Grafana, Prometheus), and the appliance's names for settings it renames (WORKER_PUBLIC_URL ->
# PUBLIC_URL, GPU_ENGINE_EXTRA_ARGS -> ENGINE_EXTRA_ARGS of GPU workers).
COMPOSE_ONLY = {
    "COMPOSE_PROJECT_NAME",
    "BIND_ADDRESS",
    "GRAFANA_PORT",
    "PROMETHEUS_PORT",
    "PROMETHEUS_BIND_ADDRESS",
    "RAY_DASHBOARD_PORT",
    "RAY_DASHBOARD_BIND_ADDRESS",
    "SVLLM_HEAD_IMAGE",
    "SVLLM_WORKER_IMAGE",
    "SVLLM_WORKER_GPU_IMAGE",
    "SVLLM_BASE_IMAGE",
    "SVLLM_GPU_BASE_IMAGE",
    "PROMETHEUS_IMAGE",
    "GRAFANA_IMAGE",
    "HEAD_SHM_SIZE",
    "WORKER_REPLICAS",
    "WORKER_PUBLIC_URL",
    "VLLM_CPU_OMP_THREADS_BIND",
    "WORKER_SHM_SIZE",
    "GPUS_PER_WORKER",
    "NVIDIA_VISIBLE_DEVICES",
    "GPU_ENGINE_EXTRA_ARGS",
    "GPU_WORKER_SHM_SIZE",
    "GPU_WORKER_IPC",
    "MODELS_DIR",
    "DEFAULT_MODEL",
    "DEFAULT_ALIAS",
    "DEFAULT_MAX_MODEL_LEN",
    "DEFAULT_EMBED_MODEL",
    "DEFAULT_EMBED_ALIAS",
    "HF_TOKEN",
    "HF_HUB_OFFLINE",
    "PROMETHEUS_RETENTION",
    "GRAFANA_ADMIN_USER",
    "GRAFANA_ADMIN_PASSWORD",
}

# Defaults the README writes for people: variable -> (what the README says, the model's default it stands for).
HUMAN_DEFAULTS: dict[str, tuple[str, Any]] = {
    "MANAGER_DB": (f"{STATE}/manager.db", str(Path.home() / ".cache/serverless-vllm/manager.db")),
    "ENGINE_LOG_DIR": (f"{STATE}/engines", str(Path.home() / ".cache/serverless-vllm/engines")),
    "WORKER_ID": ("hostname", socket.gethostname()),
    "ROUTER_ID": ("hostname-pid", f"{socket.gethostname()}-{os.getpid()}"),
    "PUBLIC_URL": ("http://<host>:<port>", ""),
    "CPU_SLOTS": ("RAM / 4 GiB", 0),
    "MAX_BODY_BYTES": ("8 MiB", 8 * 1024 * 1024),
    "RAY_ADDRESS": ("a running cluster, else a new local one", None),
}
# Documented in the README's table without being a field: where the default paths above lie (config/).
README_ONLY = {"SVLLM_STATE_DIR": STATE}

# Which settings each command's --help lists.
COMMAND_MODELS: dict[str, tuple[type[BaseSettings], ...]] = {
    "manager": (ManagerSettings, AuthSettings),
    "router": (RouterSettings, AuthSettings),
    "worker": (WorkerSettings, AuthSettings),
    "up": (ManagerSettings, RouterSettings, WorkerSettings, AuthSettings),
    "register": (CliSettings, AuthSettings),
    "ray-services": (RaySettings, ManagerSettings, RouterSettings, AuthSettings),
}


def fields() -> Iterator[tuple[type[BaseSettings], str, FieldInfo]]:
    for model in MODELS:
        for name, info in model.model_fields.items():
            yield model, name, info


FIELD_CASES = [pytest.param(m, n, i, id=f"{m.__name__}.{n}") for m, n, i in fields()]


def env_name(info: FieldInfo) -> str:
    assert isinstance(info.validation_alias, str)
    return info.validation_alias


def variables() -> dict[str, list[tuple[type[BaseSettings], str, FieldInfo]]]:
    found: dict[str, list[tuple[type[BaseSettings], str, FieldInfo]]] = {}
    for model, name, info in fields():
        if isinstance(info.validation_alias, str):  # test_every_field_has_a_description_and_a_variable: all
            found.setdefault(info.validation_alias, []).append((model, name, info))
    return found


def plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the machine running the tests."""
    for var in [*variables(), *README_ONLY]:
        monkeypatch.delenv(var, raising=False)


# =========================================================================== (a) the models


def test_every_settings_model_is_checked() -> None:
    defined = {
        v
        for module in (access, services, worker)
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, BaseSettings) and v.__module__ == module.__name__
    }
    assert defined - {settings_base.Settings} == set(MODELS)


@pytest.mark.parametrize(("model", "name", "info"), FIELD_CASES)
def test_every_field_has_a_description_and_a_variable(model: type[BaseSettings], name: str, info: FieldInfo) -> None:
    assert info.description and "\n" not in info.description, f"{model.__name__}.{name}: no one-line description"
    assert isinstance(info.validation_alias, str), f"{model.__name__}.{name}: no environment variable"
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", info.validation_alias)


def test_a_variable_shared_by_models_means_the_same() -> None:
    for var, uses in variables().items():
        defaults = {repr(info.get_default(call_default_factory=True)) for _, _, info in uses}
        types = {repr(info.annotation) for _, _, info in uses}
        assert len(defaults) == 1 and len(types) == 1, f"{var}: {uses}"


def test_settings_are_frozen_and_strict_about_names() -> None:
    settings = ManagerSettings(db_path="/x.db", heartbeat_timeout_s=30)
    assert settings.heartbeat_timeout_s == 30.0 and settings.db_path == "/x.db"
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        ManagerSettings(heartbeat_timeout=30)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="extra"):
        ManagerSettings.from_env(heartbeat_timeout=30)


# =========================================================================== (b) .env.example


def env_example() -> dict[str, tuple[str, str]]:
    """Variable -> (value, the comment lines above it)."""
    found: dict[str, tuple[str, str]] = {}
    comment: list[str] = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith("#"):
            comment.append(line)
        elif m := re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line):
            found[m[1]] = (m[2], "\n".join(comment))
            comment = []
        else:
            assert not line.strip(), f".env.example: not a comment or an assignment: {line!r}"
            comment = []
    return found


def test_env_example_names_only_settings_and_compose_variables() -> None:
    example, settings = env_example(), set(variables())
    unknown = set(example) - settings - COMPOSE_ONLY
    assert not unknown, f".env.example names variables no settings model or compose file knows: {sorted(unknown)}"
    assert not COMPOSE_ONLY & settings, "a setting is on the compose-only list"
    assert not COMPOSE_ONLY - set(example), "compose-only variables no longer in .env.example"
    compose = (ROOT / "compose.yaml").read_text() + (ROOT / "compose.gpu.yaml").read_text()
    unused = [var for var in example if "${" + var + ":" not in compose and "${" + var + "}" not in compose]
    assert not unused, f".env.example sets variables the compose files do not pass on: {unused}"


def test_env_example_states_the_models_defaults() -> None:
    """Where .env.example leaves a setting empty and says what that means ("empty = 30"), it is the default."""
    checked = 0
    for var, (value, comment) in env_example().items():
        m = re.search(r"\(empty = ([0-9.]+)", comment)
        if value or not m:
            continue
        assert var in variables(), var
        for _, _, info in variables()[var]:
            assert float(m[1]) == info.get_default(), f".env.example: {var} defaults to {info.get_default()}"
        checked += 1
    assert checked >= 4


# =========================================================================== (c) the README's table


def readme_table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| variable | default |"), rows[0]
    table: dict[str, str] = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        assert names, row
        defaults = [d.strip() for d in cells[1].split(",")] if len(names) > 1 and cells[1] else [cells[1]] * len(names)
        assert len(defaults) == len(names), f"one default per variable: {row}"
        for name, default in zip(names, defaults, strict=True):
            assert name not in table, f"{name} twice in the README's table"
            table[name] = default.replace("`", "")
    return table


def readme_says(text: str, default: Any) -> bool:
    if default is None or default in ("", [], ()):
        return text in ("", "(none)")
    if isinstance(default, bool):
        return text == ("1" if default else "0")
    if isinstance(default, int | float):
        try:
            return float(text) == default
        except ValueError:
            return False
    return text == str(default)


def test_readme_table_lists_every_variable_with_its_default() -> None:
    table, settings = readme_table(), variables()
    missing = set(settings) - set(table)
    assert not missing, f"README's configuration table lacks {sorted(missing)}"
    stale = set(table) - set(settings) - set(README_ONLY)
    assert not stale, f"README's configuration table names variables no settings model has: {sorted(stale)}"
    for var, uses in settings.items():
        for model, name, info in uses:
            default = info.get_default(call_default_factory=True)
            if var in HUMAN_DEFAULTS:
                said, meant = HUMAN_DEFAULTS[var]
                assert table[var] == said, f"README: {var} defaults to {table[var]!r}, the test expects {said!r}"
                assert default == meant, f"{model.__name__}.{name} defaults to {default!r}, README says {said!r}"
            else:
                assert readme_says(table[var], default), (
                    f"README: {var} = {table[var]!r}, {model.__name__}: {default!r}"
                )
    for var, said in README_ONLY.items():
        assert table[var] == said
    assert str(settings_base.default_state_dir()) == str(Path(STATE).expanduser())


# =========================================================================== (d) reading the environment


def sample(var: str, info: FieldInfo, tmp_path: Path) -> tuple[str, Any]:
    """A value to put in `var`, and the field's value it must give."""
    keys = tmp_path / "keys"
    keys.write_text("# one per line\nfile-key\n")
    special: dict[str, tuple[str, Any]] = {
        "SVLLM_MODEL_DIRS": ("/models,/srv:/data", ["/models", "/srv", "/data"]),
        "ENGINE_EXTRA_ARGS": (" --enforce-eager  --max-num-seqs 4 ", ["--enforce-eager", "--max-num-seqs", "4"]),
        "ALLOW_UNKNOWN_FIELDS": ("Yes", True),
        "ENGINE_ACCESS_LOG": ("Yes", True),
        "SVLLM_AUTH": (" OFF ", "off"),
        "SVLLM_API_KEYS": (" key-1 , ,key-2", ["key-1", "key-2"]),
        "SVLLM_API_KEYS_FILE": (str(keys), str(keys)),
        "SVLLM_ADMIN_KEY": (" admin-key ", "admin-key"),
        "SVLLM_WORKER_TOKEN": ("worker-token", "worker-token"),
        "ENGINE_NICE": ("7", 7),
        "CPU_ENGINE_UNIPROC": ("off", False),
        "CPU_ENGINE_CORE_FORK": ("no", False),
        "ENGINE_FORK_SERVER": ("false", False),
        "STREAM_MIGRATION": ("0", False),
        "SLEEP_HOST_MEMORY_FRACTION": ("0.5", 0.5),  # a share: at most 1
    }
    if var in special:
        return special[var]
    annotation = info.annotation
    if annotation in (str, str | None):
        return f"/from-{var}", f"/from-{var}"
    if annotation is int:
        return "4242", 4242
    if annotation is float:
        return "12.5", 12.5
    if get_origin(annotation) is Literal:
        other = next(c for c in get_args(annotation) if c != info.default)
        return str(other), other
    raise AssertionError(f"add a sample value for {var} ({annotation})")


@pytest.mark.parametrize(("model", "name", "info"), FIELD_CASES)
def test_from_env_reads_each_variable(
    model: type[BaseSettings], name: str, info: FieldInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, expected = sample(env_name(info), info, tmp_path)
    monkeypatch.setenv(env_name(info), text)
    assert plain(getattr(model.from_env(), name)) == expected  # type: ignore[attr-defined]
    assert getattr(model(), name) != getattr(model.from_env(), name), "constructing directly reads no variable"  # type: ignore[attr-defined]
    monkeypatch.setenv(env_name(info), "")
    assert model.from_env() == model(), "an empty variable is unset"  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_only_the_documented_variables_are_read(model: type[BaseSettings], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, info in model.model_fields.items():
        for other in {name, name.upper(), env_name(info).lower()} - set(variables()):
            monkeypatch.setenv(other, '["json"]' if other.endswith(("s", "S")) else "1")
    assert model.from_env() == model()  # type: ignore[attr-defined]


def test_lists_are_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_EXTRA_ARGS", '["--enforce-eager"]')
    monkeypatch.setenv("SVLLM_MODEL_DIRS", '["/models"]')
    assert WorkerSettings.from_env().engine_extra_args == ['["--enforce-eager"]']
    assert ManagerSettings.from_env().model_dirs == ['["/models"]']


def test_overrides_win_and_none_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGER_PORT", "9100")
    monkeypatch.setenv("HEARTBEAT_TIMEOUT", "11")
    settings = ManagerSettings.from_env(port=9200, heartbeat_timeout_s=None)
    assert (settings.port, settings.heartbeat_timeout_s) == (9200, 11.0)


def test_bad_values_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVLLM_AUTH", "maybe")
    with pytest.raises(ValueError, match="SVLLM_AUTH must be 'on' or 'off', not 'maybe'"):
        AuthSettings.from_env()
    monkeypatch.setenv("SVLLM_AUTH", "on")
    monkeypatch.setenv("SVLLM_API_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(OSError):
        AuthSettings.from_env()  # fail closed
    monkeypatch.setenv("MANAGER_PORT", "ninety")
    with pytest.raises(ValidationError, match="MANAGER_PORT"):
        ManagerSettings.from_env()
    monkeypatch.setenv("ENGINE_NICE", "20")
    with pytest.raises(ValidationError, match="ENGINE_NICE"):
        WorkerSettings.from_env()
    with pytest.raises(SystemExit, match=r"(?s)invalid settings.*MANAGER_PORT"):
        cli.main(["manager"])


def test_key_file_adds_keys_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# clients\nkey-2\n\n  key-3  \n")
    monkeypatch.setenv("SVLLM_API_KEYS", "key-1,key-2")
    monkeypatch.setenv("SVLLM_API_KEYS_FILE", str(keys))
    auth = AuthSettings.from_env()
    assert plain(auth.api_keys) == ["key-1", "key-2", "key-3"]
    assert AuthSettings(**dict(auth)) == auth  # validating again adds nothing
    assert "key-1" not in repr(auth) and "key-3" not in str(auth)


# =========================================================================== flags override the environment


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def derived_flags() -> Iterator[tuple[str, str, str, str, argparse.Action]]:
    """(command, option, model name, field, action) of every flag add_flag made."""
    for command, parser in subparsers().items():
        owned: dict[tuple[str, str], str] = parser.get_default("settings_flags") or {}
        for action in parser._actions:
            for (model, field), dest in owned.items():
                if action.dest == dest:
                    yield command, action.option_strings[0], model, field, action


FLAG_CASES = [pytest.param(*flag, id=f"{flag[0]} {flag[1]}") for flag in derived_flags()]


class Launched:
    """`svllm ...` run as far as its settings: services, registration and Ray replaced by recorders."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.settings: dict[str, Any] = {}
        self.levels: list[str] = []
        self.drains: list[float] = []  # each server's wait for its requests in flight when it stops
        self.execs: list[list[str]] = []

        def app(settings: Any, auth: Any = None) -> object:
            self.settings[type(settings).__name__] = settings
            return SimpleNamespace(state=SimpleNamespace(leave=None))  # a worker's app has its drain hook there

        def server(
            app: object, host: str, port: int, level: str, leave: Any = None, drain_s: float = 5.0
        ) -> SimpleNamespace:
            self.levels.append(level)
            self.drains.append(drain_s)
            return SimpleNamespace(serve=lambda: None, config=None)

        def up_settings(args: argparse.Namespace) -> Any:
            manager, router, worker = real_up_settings(args)
            self.settings.update(ManagerSettings=manager, RouterSettings=router, WorkerSettings=worker)
            return manager, router, worker

        async def register(url: str, body: dict[str, object], auth: Any = None) -> dict[str, object]:
            self.settings["CliSettings"] = SimpleNamespace(router_url=url)
            return {"alias": "a", "model_name": "m", "state": "loading"}

        def fetch_status(url: str, auth: Any = None, timeout: float = 10.0) -> FleetStatus:
            self.settings["CliSettings"] = SimpleNamespace(router_url=url)
            return FleetStatus(models=[], workers=[])

        def ray_services(args: argparse.Namespace) -> None:
            services, manager = ray_cli.ray_services_settings(args)
            self.settings.update(RaySettings=SimpleNamespace(**services), ManagerSettings=manager)

        real_up_settings = cli.up_settings
        for name, value in [("manager_app", app), ("router_app", app), ("worker_app", app), ("_server", server)]:
            monkeypatch.setattr(cli, name, value)
        monkeypatch.setattr(cli, "_run", lambda main: getattr(main, "close", lambda: None)())
        monkeypatch.setattr(cli, "up_settings", up_settings)
        monkeypatch.setattr(cli, "register_model", register)
        monkeypatch.setattr(cli_status, "fetch_status", fetch_status)

        def admin_call(what: str, url: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
            self.settings["CliSettings"] = SimpleNamespace(router_url=url)
            return {"alias": "m", "policy": {}}

        monkeypatch.setattr(cli_models, "admin_call", admin_call)
        monkeypatch.setattr(ray_cli, "cmd_ray_services", ray_services)
        monkeypatch.setattr(cli.os, "execvp", lambda file, argv: self.execs.append(argv))
        for var in ("ROUTER_HOST", "ROUTER_PORT", "MANAGER_URL"):  # `router --workers N` exports them
            monkeypatch.delenv(var, raising=False)

    def __call__(self, *argv: str) -> dict[str, Any]:
        self.settings = {}
        needs = {"register": ["--model", "m"], "patch": ["m", "--max-replicas", "1"], "delete": ["m"]}
        cli.main([*argv, *needs.get(argv[0], [])])
        return self.settings


def flag_sample(action: argparse.Action, which: int) -> tuple[str, Any]:
    if action.choices:
        choice = list(action.choices)[which]
        return str(choice), choice
    if action.type is int:
        return str(4100 + which), 4100 + which
    if action.type is float:
        return str(11.5 + which), 11.5 + which
    return f"/from-{'env' if which == 0 else 'flag'}", f"/from-{'env' if which == 0 else 'flag'}"


@pytest.mark.parametrize(("command", "option", "model", "field", "action"), FLAG_CASES)
def test_flags_override_the_environment(
    command: str, option: str, model: str, field: str, action: argparse.Action, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched = Launched(monkeypatch)
    var = env_name(getattr(config, model).model_fields[field])
    env_text, env_value = flag_sample(action, 0)
    flag_text, flag_value = flag_sample(action, 1)
    monkeypatch.setenv(var, env_text)
    assert getattr(launched(command)[model], field) == env_value, f"{command}: {var} not read"
    assert getattr(launched(command, option, flag_text)[model], field) == flag_value, f"{command} {option}"


def test_derived_flags_cover_the_commands() -> None:
    flags = {(command, option) for command, option, *_ in derived_flags()}
    expected = {
        ("manager", "--host"),
        ("manager", "--db"),
        ("manager", "--heartbeat-timeout"),
        ("router", "--workers"),
        ("router", "--manager-url"),
        ("worker", "--public-url"),
        ("worker", "--heartbeat-interval"),
        ("up", "--manager-port"),
        ("up", "--worker-port"),
        ("register", "--url"),
        ("status", "--url"),
        ("ray-services", "--ingress"),
        ("ray-services", "--db"),
    }
    assert expected <= flags


def test_log_level_flag_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    launched = Launched(monkeypatch)
    monkeypatch.setenv("LOG_LEVEL", "warning")
    launched("manager")
    launched("--log-level", "debug", "manager")
    assert launched.levels == ["warning", "debug"]


def test_up_keeps_its_local_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launched = Launched(monkeypatch)
    monkeypatch.setenv("WORKER_HOST", "0.0.0.0")
    monkeypatch.setenv("PUBLIC_URL", "http://elsewhere:1")
    monkeypatch.setenv("MANAGER_URL", "http://elsewhere:2")
    got = launched("up", "--worker-port", "7100", "--manager-port", "9100", "--state-dir", str(tmp_path))
    manager, router, worker = got["ManagerSettings"], got["RouterSettings"], got["WorkerSettings"]
    assert (manager.host, router.host, worker.host) == ("127.0.0.1", "127.0.0.1", "127.0.0.1")
    assert manager.db_path == str(tmp_path / "manager.db") and manager.model_dirs == ["/"]
    assert router.manager_url == worker.manager_url == "http://127.0.0.1:9100"
    assert worker.public_url == "http://127.0.0.1:7100" and worker.log_dir == str(tmp_path / "engines")
    monkeypatch.setenv("SVLLM_MODEL_DIRS", "/models")
    assert launched("up", "--state-dir", str(tmp_path))["ManagerSettings"].model_dirs == ["/models"]


def test_router_processes_get_the_flags_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    launched = Launched(monkeypatch)
    launched("router", "--workers", "2", "--port", "18100", "--manager-url", "http://m:1")
    assert launched.execs and "--workers" in launched.execs[0] and "0.0.0.0:18100" in launched.execs[0]
    assert (os.environ["ROUTER_PORT"], os.environ["MANAGER_URL"]) == ("18100", "http://m:1")
    monkeypatch.setenv("ROUTER_ID", "one")
    with pytest.raises(SystemExit, match="ROUTER_ID"):
        launched("router", "--workers", "2")


def test_a_router_stopping_waits_for_its_requests_as_router_drain_timeout_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROUTER_DRAIN_TIMEOUT: uvicorn's graceful shutdown of `svllm router`, gunicorn's --graceful-timeout with
    --workers (tests/test_draining.py: a router's SIGTERM with requests in flight)."""
    launched = Launched(monkeypatch)
    launched("router")
    assert launched.drains == [60.0]
    monkeypatch.setenv("ROUTER_DRAIN_TIMEOUT", "30")
    launched.drains.clear()
    launched("router")
    assert launched.drains == [30.0]
    launched("router", "--workers", "2")
    execs = launched.execs[-1]
    assert execs[execs.index("--graceful-timeout") + 1] == "30"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields
def test_idle_connections_outlast_the_official_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """KEEP_ALIVE_TIMEOUT: longer by default than the idle expiry of the official clients' pools (which the services'
    tests wait out with tests/harness.py's IdleConnection), and handed to gunicorn's processes and Serve's options."""
    import httpx
    from anthropic._constants import DEFAULT_CONNECTION_LIMITS as anthropic_limits
    from openai._constants import DEFAULT_CONNECTION_LIMITS as openai_limits
    from serverless_vllm.ray_mode.ingress import serve_start_options
    from serverless_vllm.ray_mode.services import RayServicesSettings

    from ..harness import CLIENT_IDLE_EXPIRY_S

    expiries = {openai_limits.keepalive_expiry, anthropic_limits.keepalive_expiry, httpx.Limits().keepalive_expiry}
    assert expiries == {CLIENT_IDLE_EXPIRY_S}
    assert CliSettings().keep_alive_s > CLIENT_IDLE_EXPIRY_S and RayServicesSettings().keep_alive_s == 75
    monkeypatch.setenv("KEEP_ALIVE_TIMEOUT", "90")
    launched = Launched(monkeypatch)
    launched("router", "--workers", "2")
    execs = launched.execs[-1]
    assert execs[execs.index("--keep-alive") + 1] == "90"
    services = vars(launched("ray-services", "--address", "", "--detach")["RaySettings"])
    assert services["keep_alive_s"] == 90
    for ingress in ("direct", "proxy"):
        assert serve_start_options(ingress, "h", 1, 2, 90)["http_options"]["keep_alive_timeout_s"] == 90


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields
def test_ray_services_settings_fit_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from serverless_vllm.ray_mode.services import RayServicesSettings

    defaults = RayServicesSettings()
    for name, info in RaySettings.model_fields.items():
        assert getattr(defaults, name) == info.default, f"RaySettings.{name} and RayServicesSettings disagree"
    launched = Launched(monkeypatch)
    services = vars(launched("ray-services", "--address", "", "--detach")["RaySettings"])
    settings = RayServicesSettings(**services)
    assert (
        settings.address is None and settings.detach and settings.max_ongoing_requests == defaults.max_ongoing_requests
    )


# =========================================================================== (e) --help


def help_of(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return capsys.readouterr().out


def test_help_lists_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    shown: set[str] = set()
    for command, models in COMMAND_MODELS.items():
        text = help_of(command, capsys=capsys)
        for model in models:
            for name, info in model.model_fields.items():
                assert env_name(info) in text, f"svllm {command} --help: no {env_name(info)} ({model.__name__}.{name})"
                shown.add(env_name(info))
    assert "LOG_LEVEL" in help_of(capsys=capsys)
    assert shown | {"LOG_LEVEL"} == set(variables())


@pytest.mark.parametrize(("command", "option", "model", "field", "action"), FLAG_CASES)
def test_flag_help_names_its_variable_and_default(
    command: str, option: str, model: str, field: str, action: argparse.Action
) -> None:
    info = getattr(config, model).model_fields[field]
    assert action.default is None, "an unset flag must leave the environment's value"
    assert action.help == f"{info.description} (env {env_name(info)}, default {cli_flags.shown_default(info)})".replace(
        "%", "%%"
    )


def test_settings_models_are_pydantic_settings() -> None:
    for model in MODELS:
        assert issubclass(model, BaseSettings) and issubclass(model, BaseModel)
        assert model.model_config.get("frozen") and model.model_config.get("extra") == "forbid"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields
def test_the_serve_router_waits_for_its_requests_as_router_drain_timeout_says() -> None:
    """Hybrid mode: a router replica stopping (a redeploy, a scale-down) is given ROUTER_DRAIN_TIMEOUT by Serve."""
    pytest.importorskip("ray")
    from serverless_vllm.ray_mode.serve_app import router_application

    app = router_application(
        RouterSettings(drain_timeout_s=42), AuthSettings(mode="off"), manager_name="manager", namespace="ns",
        replicas=1, max_ongoing_requests=10, num_cpus=0, ingress="proxy", api_address=("127.0.0.1", 1),
        access_log=False, client_timeout_s=1,
    )  # fmt: skip
    # Serve's deployment config (no public reader in Ray 2.60).
    assert app._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 42
