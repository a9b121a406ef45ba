"""API keys and what each may do: `INFERQ_API_KEYS` (every scope) and a keys file.

The keys file names each key and gives it scopes, so an application key can
embed and chat but not launch models:

    keys:
      - name: search-app
        key: sk-search-3b1f...          # or sha256: <hex digest of the key>
        scopes: [inference, jobs]
      - name: ops
        sha256: 9f86d081884c7d65...
        scopes: [admin]

Only digests are kept in memory, keys are compared in constant time against
every entry (no early exit that would tell which entry came close), and
neither keys nor digests are ever logged: a caller is named by its key's name.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import AuthenticationFailed


class Scope(StrEnum):
    inference = "inference"  # embeddings, rerank, chat, completions, the model list
    jobs = "jobs"  # async jobs, files, batches, corpus jobs
    admin = "admin"  # launching and terminating models, the cluster view; implies the others


ALL_SCOPES = frozenset(Scope)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Caller:
    name: str
    #: Who owns jobs and files: derived from the key, never the key itself.
    fingerprint: str
    scopes: frozenset[Scope]

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.admin in self.scopes


ANONYMOUS = Caller("anonymous", "", ALL_SCOPES)


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    key: str | None = Field(default=None, min_length=16)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    scopes: list[Scope] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_secret(self) -> _KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key or sha256")
        return self


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeyEntry]


class KeyFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes
    scopes: frozenset[Scope]


class KeyRing:
    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries

    @property
    def open(self) -> bool:
        """No keys at all: every caller is anonymous with every scope (one-host default)."""
        return not self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, token: str) -> Caller | None:
        presented = digest(token)
        found: _Entry | None = None
        for entry in self._entries:  # every entry, whatever matched: constant time in total
            if hmac.compare_digest(presented, entry.digest):
                found = entry
        if found is None:
            return None
        return Caller(found.name, presented.hex()[:32], found.scopes)

    @classmethod
    def load(cls, plain_keys: list[str], keys_file: Path | None) -> KeyRing:
        entries = [
            _Entry(f"key-{i + 1}", digest(key), ALL_SCOPES) for i, key in enumerate(plain_keys)
        ]
        if keys_file is not None:
            entries += _read_keys_file(keys_file)
        return cls(entries)


def _read_keys_file(path: Path) -> list[_Entry]:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the keys file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        # PyYAML's message quotes the offending line, which may hold a key: say where only.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "it cannot be parsed"
        raise KeyFileError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        parsed = _KeysFile.model_validate(raw)
    except ValidationError as exc:
        # Say where, never echo a value: the value may be a key.
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise KeyFileError(f"{path}: {where}: {first['msg']}") from None
    names = [e.name for e in parsed.keys]
    if len(set(names)) != len(names):
        raise KeyFileError(f"{path}: key names must be unique")
    return [
        _Entry(
            e.name,
            digest(e.key) if e.key is not None else bytes.fromhex(str(e.sha256)),
            frozenset(e.scopes),
        )
        for e in parsed.keys
    ]


def identify(keyring: KeyRing, authorization: str | None) -> Caller:
    """The caller the Authorization header names; raises AuthenticationFailed."""
    if keyring.open:
        return ANONYMOUS
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "no API key: send `Authorization: Bearer <key>`", code="missing_api_key"
        )
    found = keyring.identify(token.strip())
    if found is None:
        raise AuthenticationFailed("the API key is not valid")
    return found
