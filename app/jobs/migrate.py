"""Alembic driven from code: `inferq db ...`, `inferq up` and the API's schema check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations


def migrations_dir() -> Path:
    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # `%` would be read as interpolation by configparser.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


class SchemaBehind(RuntimeError):
    """The job database answers but needs `inferq db upgrade`: the message says so."""


def schema_problem(engine: Engine, url: str) -> str | None:
    """None when the database is at the newest revision, else what the operator must do."""
    current, head = current_revision(engine), head_revision(url)
    if current == head:
        return None
    return (
        f"the job database is at revision {current or '(empty)'}, not {head}: "
        "run `inferq db upgrade`"
    )
