"""Database engines for the job store: one function, the same for the API, workers and CLI.

SQLite is the single-host default. Several processes write to it (the API
submits, workers record results), so it runs in WAL mode with a busy timeout:
readers never block the writer and a writer waits its turn instead of failing.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy.exc
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000

#: libpq's settings (psycopg 3 and psycopg2) for a database that goes away: give up
#: connecting after a few seconds (the job routes answer 503 meanwhile), and notice
#: a pooled connection to a vanished server through TCP keepalives.
LIBPQ_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_db_engine(url: str) -> Engine:
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            from pathlib import Path

            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.close()

        return engine
    # Connections are checked before use: a PostgreSQL restart must not cost a request.
    driver = make_url(url).get_driver_name()
    connect_args = LIBPQ_CONNECT_ARGS if driver in ("psycopg", "psycopg2") else {}
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        # A request waits this long for a pooled connection, then gets its 503.
        pool_timeout=10,
        connect_args=connect_args,
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def engine_for(settings: Settings) -> Engine:
    return create_db_engine(settings.resolved_database_url())


#: What an unreachable database raises through SQLAlchemy: refused or broken
#: connections, and no pooled connection to be had in time.
UNREACHABLE = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
)


def unreachable(exc: BaseException) -> bool:
    """True when a database error says the database cannot be reached, not that a
    statement was wrong (an invalidated connection counts as unreachable)."""
    if isinstance(exc, UNREACHABLE):
        return True
    return isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated
