"""The order the suite runs its modules and tests in (tests/conftest.py applies it)."""

from __future__ import annotations

import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The longest modules (minutes each) run first, in this order, ahead of the rest: with two
# workers (scripts/test.sh; pytest-xdist hands out whole modules in this order, two to each
# worker at the start) one worker starts the tiny run and builds its shared warm start while the
# other runs the long multi-rank modules, and the short modules fill in at the end instead of
# one worker finishing a long module alone.
LONG_MODULES = (
    "tests/e2e/test_tiny_run.py",
    "tests/slurm/test_launcher.py",
    "tests/dist/test_actor_cp_train.py",
    "tests/dist/test_actor_train.py",
    "tests/e2e/test_tiny_layouts.py",
    "tests/e2e/test_tiny_paths.py",
)


def module_order(modules: list[str], seed: str | None, long_modules: tuple[str, ...] = LONG_MODULES) -> list[str]:
    """`modules` (paths relative to the repository) in running order: those of `long_modules`
    first, in that order, then the others sorted, or shuffled by `seed` when given."""
    missing = [m for m in long_modules if not os.path.exists(os.path.join(ROOT, m))]
    if missing:
        raise ValueError(f"tests/_order.py LONG_MODULES names modules that do not exist: {missing}")
    rest = sorted(m for m in modules if m not in long_modules)
    if seed:
        random.Random(seed).shuffle(rest)
    return [m for m in long_modules if m in modules] + rest


def ordered_items(items_by_module: dict[str, list], seed: str | None) -> list:
    """Every item, module by module in `module_order`; the items of each module shuffled by
    `seed` too (module-scoped fixtures stay shared), else in their file order."""
    rng = random.Random(f"{seed}/tests")
    ordered = []
    for module in module_order(list(items_by_module), seed):
        items = list(items_by_module[module])
        if seed:
            rng.shuffle(items)
        ordered.extend(items)
    return ordered
