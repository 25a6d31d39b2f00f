"""An engine's log file is rotated at its size cap: N backups kept, the in-memory tail intact, across reopenings;
the reason an engine exited is read from its last error line."""

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError
from serverless_vllm.config import WorkerSettings
from serverless_vllm.schemas import Assignment, EngineArgs
from serverless_vllm.worker.engine import EngineProcess
from serverless_vllm.worker.engine_log import CORE_GONE_REASON, EngineLog, start_fault


def line(i: int) -> str:
    return f"line {i:04d} " + "x" * 40  # 50 bytes, 51 with its newline


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def launched(*lines: str, launch: int = 1, engine_log: EngineLog | None = None) -> EngineLog:
    """An engine's log with a launch of these lines (after the earlier launches of `engine_log`)."""
    engine_log = engine_log or EngineLog("r1")
    engine_log.write_launch(launch, ["vllm"])
    for text in lines:
        engine_log.write(text)
    return engine_log


def test_rotation_at_the_cap_keeps_n_backups_and_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "r-1.log"
    engine_log = EngineLog("r-1", max_bytes=510, backups=3)  # 10 lines per file
    engine_log.open(path)
    for i in range(100):
        engine_log.write(line(i))
    assert files(path) == ["r-1.log", "r-1.log.1", "r-1.log.2", "r-1.log.3"]  # the oldest files are gone
    assert path.read_text().splitlines() == [line(i) for i in range(90, 100)]
    assert path.with_name("r-1.log.1").read_text().splitlines() == [line(i) for i in range(80, 90)]
    assert path.with_name("r-1.log.3").read_text().splitlines() == [line(i) for i in range(60, 70)]
    assert all(p.stat().st_size <= 510 for p in path.parent.iterdir())
    assert engine_log.tail(200) == [line(i) for i in range(100)]  # memory only: rotation drops nothing of it
    engine_log.close()


def test_a_reopened_file_counts_what_it_holds(tmp_path: Path) -> None:
    """Another launch (or worker process) opens the same file again: the cap counts its old lines."""
    path = tmp_path / "r-2.log"
    first = EngineLog("r-2", max_bytes=510, backups=2)
    first.open(path)
    for i in range(8):
        first.write(line(i))
    first.close()
    again = EngineLog("r-2", max_bytes=510, backups=2)
    again.open(path)
    again.open(path)  # opened twice: one handle, the size counted once
    for i in range(8, 30):
        again.write(line(i))
    assert files(path) == ["r-2.log", "r-2.log.1", "r-2.log.2"]
    assert path.with_name("r-2.log.2").read_text().splitlines() == [line(i) for i in range(10)]
    assert path.with_name("r-2.log.1").read_text().splitlines() == [line(i) for i in range(10, 20)]
    assert path.read_text().splitlines() == [line(i) for i in range(20, 30)]
    again.close()


def test_no_backups_starts_over_and_no_cap_never_rotates(tmp_path: Path) -> None:
    capped = EngineLog("r-3", max_bytes=510, backups=0)
    capped.open(tmp_path / "r-3.log")
    for i in range(25):
        capped.write(line(i))
    assert files(tmp_path / "r-3.log") == ["r-3.log"]
    assert (tmp_path / "r-3.log").read_text().splitlines() == [line(i) for i in range(20, 25)]
    capped.close()
    uncapped = EngineLog("r-4")
    uncapped.open(tmp_path / "r-4.log")
    for i in range(25):
        uncapped.write(line(i))
    assert (tmp_path / "r-4.log").read_text().splitlines() == [line(i) for i in range(25)]
    uncapped.close()


def test_an_engine_rotates_its_log_as_the_worker_settings_say(tmp_path: Path) -> None:
    """ENGINE_LOG_MAX_BYTES and ENGINE_LOG_BACKUPS reach the engine's log (no engine is started here)."""
    settings = WorkerSettings(log_dir=str(tmp_path), engine_log_max_bytes=510, engine_log_backups=1)
    assignment = Assignment(replica_id="r-5", alias="tiny", model_name="/m", engine=EngineArgs())
    engine = EngineProcess(assignment, settings, has_gpu=False)
    engine_log = engine._log  # what start() opens at engine.log_path and the launches write to
    engine_log.open(engine.log_path)
    for i in range(35):
        engine_log.write(line(i))
    assert files(engine.log_path) == ["r-5.log", "r-5.log.1"]
    assert engine.log_path.read_text().splitlines() == [line(i) for i in range(30, 35)]
    assert engine.log_tail(3) == [line(i) for i in range(32, 35)]
    engine_log.close()


# What vLLM 0.32 (CPU) printed here when registered with a max_model_len above the model's (the traceback's end).
VLLM_REFUSAL = [
    "    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)",
    "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
    "  Value error, User-specified max_model_len (4096) is greater than the derived max_model_len "
    "(max_position_embeddings=2048.0 or model_max_length=None in model's config.json). [type=value_error, "
    "input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]",
    "    For further information visit https://errors.pydantic.dev/2.14/v/value_error",
]


@pytest.mark.parametrize("prefix", ["", "(APIServer pid=4242) "])
def test_a_validation_errors_reason_says_what_is_wrong_not_only_how_many(prefix: str) -> None:
    engine_log = EngineLog("r1")
    engine_log.write_launch(1, ["vllm"])
    for text in VLLM_REFUSAL:
        engine_log.write(prefix + text)
    assert engine_log.last_error() == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: User-specified "
        "max_model_len (4096) is greater than the derived max_model_len (max_position_embeddings=2048.0 or "
        "model_max_length=None in model's config.json)."
    )


def test_a_validation_errors_fields_are_named() -> None:
    class Config(BaseModel):
        max_num_seqs: int
        dtype: str

    with pytest.raises(ValidationError) as refused:
        Config.model_validate({"max_num_seqs": "many", "dtype": 1})
    engine_log = EngineLog("r1")
    engine_log.write_launch(1, ["vllm"])
    for text in f"pydantic_core._pydantic_core.ValidationError: {refused.value}".splitlines():
        engine_log.write(text)
    engine_log.write("(APIServer pid=1) INFO shutting down")  # what comes after is not read as an error
    assert engine_log.last_error() == (
        "pydantic_core._pydantic_core.ValidationError: 2 validation errors for Config: max_num_seqs: Input should be "
        "a valid integer, unable to parse string as an integer; dtype: Input should be a valid string"
    )


def test_an_error_line_of_an_earlier_launch_is_not_this_ones_reason() -> None:
    engine_log = EngineLog("r1")
    engine_log.write_launch(1, ["vllm"])
    engine_log.write("RuntimeError: out of memory")
    engine_log.write_launch(2, ["vllm"])
    engine_log.write("INFO starting")
    assert engine_log.last_error() is None
    engine_log.write("ValueError: no such model")
    assert engine_log.last_error() == "ValueError: no such model"


# What vLLM 0.32 (CPU) printed here for a model whose weights' header is corrupt (lines of the end): the EngineCore
# process logs its traceback at ERROR (prefixed), prints it again, and the API server's last line points up to it.
VLLM_ROOT_CAUSE = [
    '(EngineCore pid=814) ERROR 12-02 14:43:06 [core.py:1510]     with safe_open(st_file, framework="pt") as f:',
    "(EngineCore pid=814) ERROR 12-02 14:43:06 [core.py:1510]          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    "(EngineCore pid=814) ERROR 12-02 14:43:06 [core.py:1510] safetensors._safetensors_rust.SafetensorError: Error "
    "while deserializing header: invalid JSON in header: expected `,` or `]` at line 1 column 193",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/vllm/v1/engine/utils.py", line 1043, in wait_for_engine_startup',
    "    raise RuntimeError(",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}",
]


def test_the_reason_is_the_root_cause_vllms_last_line_points_to() -> None:
    engine_log = launched(*VLLM_ROOT_CAUSE)
    assert engine_log.last_error() == (
        "safetensors._safetensors_rust.SafetensorError: Error while deserializing header: invalid JSON in header: "
        "expected `,` or `]` at line 1 column 193"
    )
    engine_log.write_launch(2, ["vllm"])
    engine_log.write(VLLM_ROOT_CAUSE[-1])  # nothing above it: the pointer is all there is
    assert engine_log.last_error() == VLLM_ROOT_CAUSE[-1]


def test_a_message_logged_as_an_error_is_one_but_the_traceback_logged_with_it_is_not() -> None:
    engine_log = EngineLog("r1")
    engine_log.write_launch(1, ["vllm"])
    engine_log.write("(APIServer pid=7) ERROR 12-02 14:37:01 [async_llm.py:906] AsyncLLM output_handler failed.")
    assert engine_log.last_error() == "AsyncLLM output_handler failed."
    engine_log.write("(APIServer pid=7) ERROR 12-02 14:37:01 [async_llm.py:906]     raise self._format_exception(x)")
    engine_log.write("(APIServer pid=7) WARNING 12-02 14:37:02 [api_server.py:88] shutting down")
    assert engine_log.last_error() == "AsyncLLM output_handler failed."


# What vLLM 0.32 (CPU) printed here when its EngineCore process was killed (kill -9) while serving (the API server's
# lines, paths shortened): a warning that the core is gone, then the output handler's EngineDeadError, logged with
# its traceback, pointing "above" for the root cause.
VLLM_CORE_KILLED = [
    "(Worker pid=24798) INFO 12-02 16:25:12 [multiproc_executor.py:843] Parent process exited, terminating worker "
    "queues",
    "(APIServer pid=24759) WARNING 12-02 16:25:12 [core_client.py:817] [shutdown] MPClient: engine core exited "
    "unexpectedly; starting cleanup",
    "(APIServer pid=24759) INFO 12-02 16:25:12 [core_client.py:777] [shutdown] MPClient: complete",
    "(APIServer pid=24759) ERROR 12-02 16:25:12 [async_llm.py:906] AsyncLLM output_handler failed.",
    "(APIServer pid=24759) ERROR 12-02 16:25:12 [async_llm.py:906] Traceback (most recent call last):",
    '(APIServer pid=24759) ERROR 12-02 16:25:12 [async_llm.py:906]   File "/venv/vllm/v1/engine/core_client.py", line '
    "1235, in get_output_async",
    "(APIServer pid=24759) ERROR 12-02 16:25:12 [async_llm.py:906]     raise self._format_exception(outputs) from None",
    "(APIServer pid=24759) ERROR 12-02 16:25:12 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: "
    "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    'INFO:     127.0.0.1:45984 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error',
    "INFO:     Shutting down",
]


def test_an_engine_core_killed_while_serving_is_the_reason_not_the_dead_engines_pointer() -> None:
    assert launched(*VLLM_CORE_KILLED).last_error() == CORE_GONE_REASON


def test_an_engine_core_error_while_serving_is_the_reason() -> None:
    """The EngineCore's own error above the output handler's pointer (its lines written in vLLM's format, as
    core.py logs a fatal error: no such failure could be caused on purpose here)."""
    core = "(EngineCore pid=9) ERROR 12-02 16:30:01 [core.py:1512] "
    engine_log = launched(
        core + "EngineCore encountered a fatal error.",
        core + "Traceback (most recent call last):",
        core + "    raise RuntimeError('bad kernel')",
        core + "RuntimeError: bad kernel",
        *VLLM_CORE_KILLED[3:],  # the output handler's lines
    )
    assert engine_log.last_error() == "RuntimeError: bad kernel"
    # Nothing above the pointer's own traceback: the pointer is all there is.
    launched(*VLLM_CORE_KILLED[3:], launch=2, engine_log=engine_log)
    assert engine_log.last_error() == VLLM_CORE_KILLED[-3].partition("[async_llm.py:906] ")[2]


# vLLM 0.32's own last lines for an argument it does not know (`--engine-arg=--no-such-flag`): argparse's usage, one
# line of which lists ERROR among --log-level's choices, then its refusal.
VLLM_UNKNOWN_ARGUMENT = [
    "usage: api_server.py [-h] [--headless] [--api-server-count API_SERVER_COUNT]",
    "                     [--uvicorn-log-level {critical,debug,error,info,trace,warning}]",
    "                     [--log-level {CRITICAL,ERROR,WARNING,INFO,DEBUG,NOTSET}]",
    "                     [--enable-log-requests | --no-enable-log-requests]",
    "                     [model_tag]",
    "api_server.py: error: unrecognized arguments: --no-such-flag",
]


def test_an_argument_vllm_refuses_is_the_reason_not_its_usage() -> None:
    reason = launched(*VLLM_UNKNOWN_ARGUMENT).last_error()
    assert reason == "api_server.py: error: unrecognized arguments: --no-such-flag"


# Reasons the supervisor wrote for starts that failed (seen on this machine with vLLM 0.32, the hub unreachable).
START_FAULTS = [
    (2, "api_server.py: error: unrecognized arguments: --no-such-flag"),
    (
        1,
        "pydantic_core._pydantic_core.ValidationError: 2 validation errors for SchedulerConfig: "
        "max_num_batched_tokens: Input should be greater than or equal to 1; max_num_seqs: Input should be greater "
        "than or equal to 1",
    ),
    (
        1,
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: Invalid repository ID or "
        "local directory specified: '/tmp/try/emptydir'.",
    ),
    (
        1,
        "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
        "cached files.",
    ),
    # transformers' and the hub's words where the hub answers (utils/hub.py, huggingface_hub/errors.py).
    (
        1,
        "OSError: someorg/nomodel is not a local folder and is not a valid model identifier listed on "
        "'https://huggingface.co/models'",
    ),
    (1, "huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error."),
    (1, "OSError: You are trying to access a gated repo."),
]
OTHER_FAILURES = [
    (1, "RuntimeError: Cannot re-initialize CUDA in forked subprocess."),
    (1, CORE_GONE_REASON),
    (1, "torch.OutOfMemoryError: CUDA out of memory."),
    (1, None),  # nothing in its log
    # Killed by a signal, whatever its log said last.
    (-9, "api_server.py: error: unrecognized arguments: --no-such-flag"),
    (-15, "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig: x"),
]


@pytest.mark.parametrize(("returncode", "error"), START_FAULTS)
def test_a_refused_argument_or_a_missing_model_is_a_start_fault(returncode: int, error: str) -> None:
    assert start_fault(returncode, error)


@pytest.mark.parametrize(("returncode", "error"), OTHER_FAILURES)
def test_other_failures_are_not_start_faults(returncode: int, error: str | None) -> None:
    assert not start_fault(returncode, error)
