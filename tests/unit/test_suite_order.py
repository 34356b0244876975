"""The suite's own machinery: the module order (longest first, then shuffled) and the directory
that xdist's workers build once and share (tests/_order.py, tests/_run_once.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from tests._order import LONG_MODULES, ROOT, module_order, ordered_items
from tests._run_once import COMPLETE, built_once

SHORT = ["tests/unit/test_a.py", "tests/unit/test_b.py", "tests/unit/test_c.py", "tests/dist/test_d.py"]


def test_long_modules_first_in_their_order_then_the_rest_shuffled_by_the_seed():
    modules = SHORT + list(reversed(LONG_MODULES))
    order = module_order(modules, "2026")
    assert order[:len(LONG_MODULES)] == list(LONG_MODULES)
    assert sorted(order[len(LONG_MODULES):]) == sorted(SHORT)
    assert order == module_order(list(reversed(modules)), "2026")  # the seed alone decides
    assert {tuple(module_order(modules, str(seed))) for seed in range(20)} != {tuple(order)}
    assert module_order(modules, None)[len(LONG_MODULES):] == sorted(SHORT)
    # a subset of the suite keeps the long modules it has, in their order
    assert module_order([LONG_MODULES[2], *SHORT, LONG_MODULES[0]], None)[:2] == [LONG_MODULES[0], LONG_MODULES[2]]


def test_items_stay_with_their_module_and_every_one_is_kept():
    by_module = {m: [f"{m}::t{i}" for i in range(5)] for m in SHORT}
    ordered = ordered_items(by_module, "7")
    assert sorted(ordered) == sorted(i for items in by_module.values() for i in items)
    modules = [i.split("::")[0] for i in ordered]
    assert [m for k, m in enumerate(modules) if k == 0 or modules[k - 1] != m] == module_order(SHORT, "7")
    assert ordered_items(by_module, None) == [i for m in sorted(SHORT) for i in by_module[m]]


def test_a_long_module_that_no_longer_exists_is_named():
    with pytest.raises(ValueError, match="tests/e2e/gone.py"):
        module_order(SHORT, None, long_modules=("tests/e2e/gone.py",))


class _Worker:
    """pytest config of an xdist worker."""

    workerinput = {"workerid": "gw0"}


class _Factory:
    """tmp_path_factory of one xdist worker: its base directory is <run>/<worker>."""

    def __init__(self, run, worker: str):
        self.base = run / worker

    def getbasetemp(self):
        return self.base


def test_workers_build_the_shared_directory_once_and_all_get_it(tmp_path):
    builds, paths = [], []

    def build(path) -> None:
        builds.append(path)
        time.sleep(0.3)  # the other workers ask meanwhile and must wait, not build
        (path / "model").write_text("weights")

    def worker(name: str) -> None:
        paths.append(built_once(_Worker(), _Factory(tmp_path, name), "tiny_init", build))

    threads = [threading.Thread(target=worker, args=(f"gw{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and paths == [tmp_path / "tiny_init"] * 3
    assert (tmp_path / "tiny_init" / "model").read_text() == "weights" and (tmp_path / "tiny_init" / COMPLETE).exists()


def test_a_failed_build_is_redone_by_the_next_worker(tmp_path):

    def broken(path) -> None:
        (path / "partial").write_text("half")
        raise RuntimeError("warm start crashed")

    with pytest.raises(RuntimeError, match="warm start crashed"):
        built_once(_Worker(), _Factory(tmp_path, "gw0"), "tiny_init", broken)
    path = built_once(_Worker(), _Factory(tmp_path, "gw1"), "tiny_init", lambda p: (p / "model").write_text("ok"))
    assert sorted(f.name for f in path.iterdir()) == sorted(["model", COMPLETE])


def test_without_xdist_each_session_builds_its_own(tmp_path_factory, monkeypatch):
    # a pytest started by a test under xdist inherits the worker's variables, not its config
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    config = object()
    first = built_once(config, tmp_path_factory, "own", lambda p: (p / "x").write_text("1"))
    second = built_once(config, tmp_path_factory, "own", lambda p: (p / "x").write_text("2"))
    assert first != second and (first / "x").read_text() == "1" and (second / "x").read_text() == "2"


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_random_seed_is_drawn_once_for_all_workers(how):
    """`--shuffle random` (or CTPO_TEST_SHUFFLE=random) under two xdist workers: each worker
    parses the arguments again, and a seed of its own would give another order, which xdist
    refuses ("Different tests were collected")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTPO_TEST_SHUFFLE", "PYTEST_XDIST"))}
    args = ["--shuffle", "random"] if how == "option" else []
    if how == "environment":
        env["CTPO_TEST_SHUFFLE"] = "random"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", *args,
                          "tests/unit/test_suite_order.py", "-k", "not random_seed"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "6 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    assert "test order shuffled: rerun it with --shuffle " in out.stdout
