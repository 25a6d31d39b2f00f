"""An engine's log file is rotated at its size cap: N backups kept, the in-memory tail intact, across reopenings."""

from pathlib import Path

from serverless_vllm.config import WorkerSettings
from serverless_vllm.schemas import Assignment, EngineArgs
from serverless_vllm.worker.engine import EngineProcess
from serverless_vllm.worker.engine_log import EngineLog


def line(i: int) -> str:
    return f"line {i:04d} " + "x" * 40  # 50 bytes, 51 with its newline


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


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
