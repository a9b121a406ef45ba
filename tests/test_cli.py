"""The `inferq` command as a person meets it: a version, help on every flag, one clear
line and a non-zero exit when the API cannot be reached or a setting is wrong, and
client commands pointed at the API by INFERQ_API_URL."""

from __future__ import annotations

import argparse
import json

from app import __version__
from app.cli import build_parser
from app.embedded_redis import free_port
from tests.procs import inferq_command, subprocess_env


def test_version_and_help_on_every_flag() -> None:
    done = inferq_command(subprocess_env({}), "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"inferq {__version__}"
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"inferq {name} {action.option_strings or action.dest}"
        assert command.epilog and "examples:" in command.epilog, name


def test_an_unreachable_api_is_one_line_and_exit_1() -> None:
    port = free_port()
    for env, args in (
        (subprocess_env({}), ("list", "--api", f"http://127.0.0.1:{port}")),
        (subprocess_env({"INFERQ_API_URL": f"http://127.0.0.1:{port}"}), ("terminate", "m")),
    ):
        done = inferq_command(env, *args)
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("inferq: cannot reach the API (http://127.0.0.1:"), line


def test_a_wrong_setting_is_named() -> None:
    done = inferq_command(subprocess_env({"INFERQ_API_PORT": "ninety"}), "list")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("inferq: invalid setting INFERQ_API_PORT:"), done.stderr


def test_list_as_json_from_the_api_url(api: str) -> None:
    done = inferq_command(subprocess_env({"INFERQ_API_URL": api}), "list", "--json")
    assert done.returncode == 0, done.stderr
    models = {m["id"]: m for m in json.loads(done.stdout)}
    assert models["minilm"]["kind"] == "embedding"
    assert models["minilm"]["model_type"] == "embedding"
