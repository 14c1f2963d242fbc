"""The remote commands start without the engine: `secateurs jobs ...` and `secateurs calibration ...` import
neither torch nor transformers nor core.pruning (cli/lazy.py imports each command when it runs), while the
lazily listed help lines are the commands' own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("torch", "transformers", "core.pruning", "core.pruning.methods", "cli.prune", "cli.flags")

# runs the CLI as `python -m cli ARGS` does, then reports which of HEAVY were imported
PROBE = (
    "import json, runpy, sys\n"
    "watched = json.loads(sys.argv[2])\n"
    "sys.argv = ['secateurs', *json.loads(sys.argv[1])]\n"
    "code = 0\n"
    "try:\n"
    "    runpy.run_module('cli', run_name='__main__', alter_sys=True)\n"
    "except SystemExit as e:\n"
    "    code = e.code or 0\n"
    "print('\\nLOADED ' + json.dumps([m for m in watched if m in sys.modules]))\n"
    "sys.exit(code)\n"
)


def loaded(*args: str) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "SECATEURS_RETRIES": "0"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("LOADED "))
    return out.returncode, json.loads(line.removeprefix("LOADED ")), out.stdout + out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("jobs", "--help"),
        ("jobs", "watch", "--help"),
        ("calibration", "upload", "--help"),
        ("--help",),
    ],
)
def test_remote_commands_start_without_the_engine(args: tuple[str, ...]):
    code, heavy, output = loaded(*args)
    assert code == 0, output
    assert heavy == [], (args, heavy)
    assert "Usage:" in output


def test_a_remote_command_that_runs_imports_no_engine_either():
    # `jobs list` against a server that is not there: it runs (and fails to connect) without the engine
    code, heavy, output = loaded("jobs", "list", "--server", "http://127.0.0.1:9", "--api-key", "x")
    assert code == 1, output
    assert heavy == [], heavy


def test_prune_and_submit_still_get_their_generated_flags():
    code, heavy, output = loaded("jobs", "submit", "--help")
    assert code == 0, output
    assert "--sparsity" in output and "--percdamp" in output and "--device" not in output
    assert "cli.flags" in heavy  # the flags of `secateurs prune`, built when submit runs
    code, _, output = loaded("prune", "--help")
    assert code == 0 and "--percdamp" in output and "--device" in output, output


def test_the_listed_help_lines_are_the_commands_own():
    from typer.testing import CliRunner

    from cli.app import _Commands as Root
    from cli.jobs import _Commands as Jobs
    from cli.lazy import load

    for group in (Root, Jobs):
        for name, (target, short_help) in group.lazy.items():
            cmd = load(name, target)
            assert cmd.name == name
            assert (cmd.help or "").strip().splitlines()[0] == short_help, (name, cmd.help)
    from cli.app import app

    r = CliRunner().invoke(app, ["jobs", "sbumit"])
    assert r.exit_code == 2 and "Did you mean 'submit'" in r.output, r.output
