"""README.md's commands, run as written.

Every command in README.md's ```bash blocks is either run here exactly as written (the dry run),
run as written with a stated addition (the Slurm submission, which needs a cluster, gets
`--dry-run`), run elsewhere as written (the tiny run: tests/e2e/test_tiny_run.py, with step
overrides), or excluded with the reason (`bash scripts/test.sh` is this suite). A README command
that none of these covers fails `test_every_readme_command_is_covered`.

Every `python -m ctpo_megatron.X` named in README.md answers `--help` with exit 0 and a help
text for each of its options.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")

TINY = "bash launch/ctpo_tiny.sh"
DRY_RUN = "bash launch/ctpo_32b.sh --dry-run"
SUBMIT_PREFIX = "bash launch/ctpo_32b.sh model.path="
COLOCATED = "ROLLOUT_PLACEMENT=colocated bash launch/ctpo_32b.sh --dry-run --cluster qwen3_4b"
COVERAGE = {
    TINY: "tests/e2e/test_tiny_run.py and test_tiny_paths.py run it (TINY_COMMAND) with trainer.total_steps and other overrides",
    "bash scripts/test.sh": "excluded: it is this test suite (running it here would recurse)",
    DRY_RUN: "run as written: test_dry_run_prints_a_plan",
    COLOCATED: "run as written: test_colocated_dry_run_plans_one_shared_node",
    "source .venv/bin/activate": "test_the_environment_to_activate_is_the_one_the_tests_run_in",
    "python -m ctpo_megatron.export runs/tiny runs/tiny/hf":
        "tests/e2e/test_tiny_run.py runs it on the tiny run's directory (runs/tiny -> that directory)",
    "torchrun --nproc-per-node 8 -m ctpo_megatron.export RUN_DIR /ckpt/ctpo-qwen3-32b --step 200 "
    "--dtype bf16 --max-shard-size 5GB":
        "excluded: a 32B checkpoint on 8 ranks; the same CLI and options run on a tiny model under "
        "ranks in tests/dist/test_export.py",
    "python -m sglang.launch_server --model-path /ckpt/ctpo-qwen3-32b --tp 8 --port 30000":
        "excluded: SGLang needs GPUs; its flags are checked against SGLang's own server arguments "
        "in tests/unit/test_sglang_sources.py",
    "python -m ctpo_megatron.rollout.serving.server --model runs/tiny/hf --port 30000":
        "tests/e2e/test_tiny_run.py serves the exported tiny model with it (a free port for 30000)",
    'python -m ctpo_megatron.rollout.agent --url http://127.0.0.1:30000 --tokenizer runs/tiny/hf '
    '--prompt "What is 17 * 23?" --ground-truth 391 -n 8':
        "tests/e2e/test_tiny_run.py runs it against that server and checks 8 scored samples",
    SUBMIT_PREFIX: "run as written plus --dry-run (submitting needs a Slurm cluster; tests/slurm "
                   "submits to a real local one): test_submit_command_plans_with_its_overrides",
}


def readme_commands() -> list[str]:
    """Commands of the ```bash blocks: continuations joined, comments and extra spaces dropped."""
    text = open(README).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
    return commands


def readme_modules() -> list[str]:
    """Every `python -m ctpo_megatron...` module README.md names (its command-line tools)."""
    return sorted(set(re.findall(r"python -m (ctpo_megatron(?:\.\w+)+)", open(README).read())))


def _covered_by(command: str) -> str | None:
    for key in COVERAGE:
        if command == key or (key.endswith("=") and command.startswith(key)):
            return key
    return None


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 4, commands
    uncovered = [c for c in commands if _covered_by(c) is None]
    assert not uncovered, f"README commands no test runs (add them to COVERAGE): {uncovered}"
    assert {_covered_by(c) for c in commands} == set(COVERAGE), "COVERAGE lists commands README no longer has"


def test_tiny_run_test_runs_the_readme_command():
    from tests.e2e._launch import TINY_COMMAND  # what tests/e2e launches by default

    assert " ".join(TINY_COMMAND) == TINY and TINY in readme_commands()


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def check_plan(stdout: str) -> None:
    """A plan names its nodes per role, the parallel sizes and the servers, consistently."""
    total_nodes, gpus_per_node = map(int, re.search(r"(\d+) node\(s\) x (\d+) GPU\(s\)", stdout).groups())
    trainer_nodes = int(re.search(r"trainer\s*: (\d+) node\(s\)", stdout).group(1))
    world, tp, pp, cp, dp = map(int, re.search(r"world (\d+) = tp (\d+) x pp (\d+) x cp (\d+) x dp (\d+)",
                                               stdout).groups())
    rollout_nodes, servers, gpus_per_server = map(int, re.search(
        r"rollout\s*: (\d+) node\(s\).*?, (\d+) \w+ server\(s\) x (\d+) GPU\(s\)", stdout).groups())
    assert total_nodes == trainer_nodes + rollout_nodes, stdout
    assert world == tp * pp * cp * dp == trainer_nodes * gpus_per_node, stdout
    assert servers * gpus_per_server == rollout_nodes * gpus_per_node, stdout
    assert len(re.findall(r"^\s+http://\S+:\d+\s+gpus [\d,]+$", stdout, re.M)) == servers, stdout
    assert re.search(r"per GPU: weights [\d.]+ GiB", stdout), stdout
    assert re.search(r"router\s*: http://\S+", stdout), stdout


def test_dry_run_prints_a_plan():
    (command,) = [c for c in readme_commands() if c == DRY_RUN]
    out = _run(shlex.split(command))
    assert out.returncode == 0, f"`{command}` exited {out.returncode}:\n{out.stderr[-3000:]}"
    check_plan(out.stdout)


def test_colocated_dry_run_plans_one_shared_node():
    (command,) = [c for c in readme_commands() if c == COLOCATED]
    assignment, *argv = shlex.split(command)
    name, value = assignment.split("=", 1)
    out = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, name: value},
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"`{command}` exited {out.returncode}:\n{out.stderr[-3000:]}"
    assert "1 node(s) x 8 GPU(s)" in out.stdout and "rollout  : 0 node(s)" in out.stdout, out.stdout
    assert "colocated on the training node's GPUs" in out.stdout, out.stdout
    assert len(re.findall(r"^\s+http://node00:\d+\s+gpus \d$", out.stdout, re.M)) == 8, out.stdout


def test_submit_command_plans_with_its_overrides():
    (command,) = [c for c in readme_commands() if c.startswith(SUBMIT_PREFIX)]
    argv = shlex.split(command)
    out = _run(argv + ["--dry-run"])
    assert out.returncode == 0, f"`{command} --dry-run` exited {out.returncode}:\n{out.stderr[-3000:]}"
    check_plan(out.stdout)
    overrides = out.stdout.split("trainer overrides:", 1)[1].split()
    for arg in argv[2:]:
        assert arg in overrides, f"{arg} is not passed to the trainer:\n{out.stdout}"


def undocumented_options(help_text: str) -> list[str]:
    """argparse entries (two-space-indented lines under a section) that have no help text."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not re.match(r"^  \S", line):
            continue
        entry = line.strip()
        if re.search(r"\S\s{2,}\S", entry):  # help on the same line
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r"^ {4,}\S", following):
            missing.append(entry)
    return missing


def test_readme_names_the_tools():
    assert len(readme_modules()) >= 7, readme_modules()


@pytest.mark.parametrize("module", readme_modules())
def test_help(module):
    out = _run([sys.executable, "-m", module, "--help"])
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    if module == "ctpo_megatron.train":  # Hydra's help: the config groups and every option
        groups = sorted(d for d in os.listdir(os.path.join(ROOT, "configs"))
                        if os.path.isdir(os.path.join(ROOT, "configs", d)))
        for group in groups:
            assert re.search(rf"^{group}: \w", text, re.M), f"group {group} missing from --help"
        assert "trainer:" in text and "total_steps:" in text
        return
    if module == "ctpo_megatron.evaluate":  # Hydra overrides: every eval.* key is documented
        from ctpo_megatron.evaluate import EvalConfig

        keys = [f.name for f in dataclasses.fields(EvalConfig)]
        assert text.startswith("Scores a model") and all(k in text for k in keys), text[-500:]
        return
    assert text.startswith(f"usage: python -m {module} "), text[:300]
    assert len(text.split("\n\n")[1].split()) >= 5, f"no description after the usage line:\n{text}"
    assert not undocumented_options(text), f"options without help: {undocumented_options(text)}"


def test_undocumented_options_are_found():
    import argparse

    parser = argparse.ArgumentParser(prog="tool", description="A tool.")
    parser.add_argument("--documented", help="says what it does")
    parser.add_argument("--bare")
    parser.add_argument("--a-long-option-name-without-any-help", action="store_true")
    assert undocumented_options(parser.format_help()) == ["--bare BARE", "--a-long-option-name-without-any-help"]


def test_the_environment_to_activate_is_the_one_the_tests_run_in():
    """README's later commands (`python -m ...`) need the venv the two commands install:
    scripts/test.sh runs the tests with its interpreter, and its activate script exists."""
    venv = os.path.join(ROOT, ".venv")
    assert os.path.isfile(os.path.join(venv, "bin", "activate"))
    assert os.path.samefile(os.path.join(venv, "bin", "python"), os.path.join(sys.prefix, "bin", "python"))
