"""The code's own rules, checked on every run: the linter and the type checker pass, and imports run one way
(Qt only in bcc_desk/gui, the core never reaches into the trainer, no cycles, the trainer talks to
the application through the bundle and its preprocessing)."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from conftest import REPO

QT = ("PySide6", "shiboken6", "pytestqt")
# What the trainer may use of the application: the bundle and report contracts (import-reviews
# reads the exported workbooks), the shared preprocessing, numerics and image reading, and the
# slide's consensus (the review flag's rule, which the trainer's cut-off for slides is chosen with),
# the colour check (its profile is part of the bundle) and the review reasons a Prediction carries.
# Its checks (evaluate, int8, the colour check's shifts) run the application's own engine on
# purpose: a figure must come from the path a lab runs.
TRAINER_MAY_IMPORT = {"bcc_desk", "bcc_desk.bundle", "bcc_desk.preprocess", "bcc_desk.devices", "bcc_desk.images",
                      "bcc_desk.cli_help", "bcc_desk.logs", "bcc_desk.files", "bcc_desk.report",
                      "bcc_desk.slides", "bcc_desk.colour", "bcc_desk.prediction", "bcc_desk.safe_text",
                      "bcc_desk.bundle_meta", "bcc_desk.stats"}
TRAINER_ENGINE_USERS = {"trainer.evaluate", "trainer.int8", "trainer.review_threshold", "trainer.fit", "trainer.cli",
                        "trainer.colour_check"}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (a hidden import is one too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import mod`
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = {_module(p): p for p in (REPO / package).rglob("*.py")}
    known = set(modules) | {m for m in ("bcc_desk", "trainer")}
    return {name: {i for i in _imports(path) if i in known and i != name} for name, path in modules.items()}


def test_ruff_passes() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_type_hints_check() -> None:
    """mypy over bcc_desk and trainer, as pyproject.toml configures it (#38: hints that are never
    checked drift from the code)."""
    proc = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_qt_only_in_the_gui_package() -> None:
    for package in ("bcc_desk", "trainer"):
        for path in (REPO / package).rglob("*.py"):
            if path.is_relative_to(REPO / "bcc_desk" / "gui") and path.name != "syslibs.py":
                continue  # syslibs must run before Qt loads: it is held to the rule too
            qt = sorted(i for i in _imports(path) if i.split(".")[0] in QT)
            assert not qt, f"{path.relative_to(REPO)} imports {qt}"


def test_the_core_never_imports_the_trainer() -> None:
    for name, deps in _graph("bcc_desk").items():
        assert not {d for d in deps if d.split(".")[0] == "trainer"}, name
    for path in (REPO / "bcc_desk").rglob("*.py"):
        assert not {i for i in _imports(path) if i.split(".")[0] == "trainer"}, path


def test_no_import_cycles() -> None:
    for package in ("bcc_desk", "trainer"):
        graph = _graph(package)
        # A package's __init__ is imported by every submodule: leave that edge out of the cycle check.
        graph = {name: {d for d in deps if d != package} for name, deps in graph.items()}
        try:
            tuple(TopologicalSorter(graph).static_order())
        except CycleError as exc:
            raise AssertionError(f"import cycle in {package}: {' -> '.join(exc.args[1])}") from None


def test_the_trainer_uses_the_application_only_through_the_bundle_and_its_preprocessing() -> None:
    for path in (REPO / "trainer").rglob("*.py"):
        name = _module(path)
        used = {i for i in _imports(path) if i.split(".")[0] == "bcc_desk" and i.count(".") <= 1}
        used = {i for i in used if i in TRAINER_MAY_IMPORT or (REPO / Path(*i.split("."))).with_suffix(".py").exists()}
        allowed = TRAINER_MAY_IMPORT | ({"bcc_desk.classifier", "bcc_desk.quantize"} if name in TRAINER_ENGINE_USERS else set())
        assert used <= allowed, f"{name} imports {sorted(used - allowed)}"


# Where logging may be configured: the entry points, the one set-up module, and the daemon's log
# file (started by `bcc watch` and the app's watch, restored by the app's watch thread).
LOGGING_SET_UP = {"bcc_desk/logs.py", "bcc_desk/cli.py", "trainer/cli.py", "bcc_desk/gui/app.py", "bcc_desk/watch/site.py",
                  "bcc_desk/gui/worker.py"}


def test_logging_is_configured_only_where_a_program_starts() -> None:
    for package in ("bcc_desk", "trainer"):
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            calls = [node.func.attr for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                     and node.func.attr in ("setLevel", "basicConfig", "addHandler")]
            assert not calls or rel in LOGGING_SET_UP, f"{rel} configures logging ({', '.join(calls)})"


def test_no_module_grows_past_what_one_reader_holds() -> None:
    """Issue #38: no file in bcc_desk/ or trainer/ over 500 lines, the window under 450
    (watch/watcher.py had crept to 513 unnoticed)."""
    lines = {p.relative_to(REPO).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for package in ("bcc_desk", "trainer") for p in (REPO / package).rglob("*.py")}
    assert [f"{name}: {n}" for name, n in sorted(lines.items()) if n > 500] == []
    assert lines["bcc_desk/gui/main_window.py"] < 450
