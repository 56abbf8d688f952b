"""Conversations on disk: one SQLite database (WAL mode, one transaction per change).

The database lives in the platform's user data folder (``platformdirs``), or in
``$EDGEINFER_DATA_DIR`` when set (tests use that). Every write is a short transaction, so a
``kill -9`` in the middle of a generation loses at most the reply being generated; every
message already written is on disk and the database opens cleanly (SQLite's WAL recovery).

Nothing here imports Textual, torch or a backend: the TUI and tests use it as plain Python.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edgeinfer.errors import EdgeinferError
from edgeinfer.fileio import atomic_write

DB_NAME = "chat.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    title         TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    model         TEXT NOT NULL DEFAULT 'default',
    backend       TEXT NOT NULL DEFAULT 'llama.cpp',
    params        TEXT NOT NULL DEFAULT '{}',
    created       REAL NOT NULL,
    updated       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT NOT NULL,
    meta            TEXT NOT NULL DEFAULT '{}',
    created         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


class StorageError(EdgeinferError):
    """The chat database cannot be opened or written."""


def data_dir() -> Path:
    """Where edgeinfer keeps its data: ``$EDGEINFER_DATA_DIR`` or the platform's user data folder."""
    env = os.environ.get("EDGEINFER_DATA_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edgeinfer", appauthor=False))


def default_db_path() -> Path:
    """The chat database file inside :func:`data_dir`."""
    return data_dir() / DB_NAME


@dataclass
class Conversation:
    """One conversation's settings (its messages are stored separately)."""

    id: int
    title: str
    system_prompt: str = ""
    model: str = "default"
    backend: str = "llama.cpp"
    params: dict = field(default_factory=dict)  # SamplingParams fields the user changed
    created: float = 0.0
    updated: float = 0.0


@dataclass
class StoredMessage:
    """One message of a conversation. ``meta`` holds finish reason and timings of replies."""

    id: int
    conversation_id: int
    role: str
    content: str
    meta: dict = field(default_factory=dict)
    created: float = 0.0

    def as_chat(self) -> dict:
        return {"role": self.role, "content": self.content}


class ChatStore:
    """Conversations and messages in one SQLite file.

    Args:
        path: database file (created with its folder if missing); default :func:`default_db_path`.

    Raises:
        StorageError: the file is not a database or its folder cannot be written.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit; explicit BEGIN/COMMIT in _tx().
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
            self.db.execute("PRAGMA foreign_keys=ON")
            with self._tx():
                for stmt in _SCHEMA.split(";"):  # executescript() would commit outside the transaction
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StorageError(f"{self.path}: cannot open the chat database ({e}); "
                               f"move the file away or set EDGEINFER_DATA_DIR to another folder") from None
        except OSError as e:
            raise StorageError(f"{self.path.parent}: cannot create the data folder ({e}); "
                               f"set EDGEINFER_DATA_DIR to a writable folder") from None

    # -- plumbing ----------------------------------------------------------------------------
    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            return False

    def _tx(self) -> "ChatStore._Tx":
        return ChatStore._Tx(self.db)

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _conv(row) -> Conversation:
        return Conversation(id=row[0], title=row[1], system_prompt=row[2], model=row[3], backend=row[4],
                            params=json.loads(row[5] or "{}"), created=row[6], updated=row[7])

    @staticmethod
    def _msg(row) -> StoredMessage:
        return StoredMessage(id=row[0], conversation_id=row[1], role=row[2], content=row[3],
                             meta=json.loads(row[4] or "{}"), created=row[5])

    # -- conversations -----------------------------------------------------------------------
    def create_conversation(self, title: str = "New chat", *, system_prompt: str = "", model: str = "default",
                            backend: str = "llama.cpp", params: dict | None = None) -> Conversation:
        """Create and return an empty conversation."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO conversations (title, system_prompt, model, backend, params, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (title, system_prompt, model, backend, json.dumps(params or {}), now, now))
            cid = cur.lastrowid
        return self.get_conversation(cid)

    def get_conversation(self, cid: int) -> Conversation:
        """Return conversation ``cid``; raises :class:`StorageError` if it does not exist."""
        row = self.db.execute("SELECT id, title, system_prompt, model, backend, params, created, updated "
                              "FROM conversations WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise StorageError(f"{self.path}: no conversation with id {cid}")
        return self._conv(row)

    def list_conversations(self, search: str = "") -> list[Conversation]:
        """Conversations, most recently updated first; ``search`` matches titles and message text."""
        sql = "SELECT id, title, system_prompt, model, backend, params, created, updated FROM conversations"
        args: tuple = ()
        if search.strip():
            like = "%" + search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += (" WHERE title LIKE ? ESCAPE '\\' OR id IN "
                    "(SELECT conversation_id FROM messages WHERE content LIKE ? ESCAPE '\\')")
            args = (like, like)
        sql += " ORDER BY updated DESC, id DESC"
        return [self._conv(r) for r in self.db.execute(sql, args)]

    def update_conversation(self, cid: int, **fields) -> Conversation:
        """Change ``title``, ``system_prompt``, ``model``, ``backend`` or ``params`` of a conversation."""
        allowed = {"title", "system_prompt", "model", "backend", "params"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update conversation fields {sorted(bad)}")
        if "params" in fields:
            fields["params"] = json.dumps(fields["params"] or {})
        if fields:
            cols = ", ".join(f"{k} = ?" for k in fields)
            with self._tx() as db:
                db.execute(f"UPDATE conversations SET {cols}, updated = ? WHERE id = ?",
                           (*fields.values(), time.time(), cid))
        return self.get_conversation(cid)

    def delete_conversation(self, cid: int) -> None:
        """Delete a conversation and its messages."""
        with self._tx() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (cid,))
            db.execute("DELETE FROM conversations WHERE id = ?", (cid,))

    # -- messages ----------------------------------------------------------------------------
    def add_message(self, cid: int, role: str, content: str, meta: dict | None = None) -> StoredMessage:
        """Append a message (committed before this returns) and touch the conversation.

        Raises:
            StorageError: the conversation does not exist (e.g. deleted while a reply was streaming).
        """
        now = time.time()
        try:
            with self._tx() as db:
                cur = db.execute("INSERT INTO messages (conversation_id, role, content, meta, created) "
                                 "VALUES (?, ?, ?, ?, ?)", (cid, role, content, json.dumps(meta or {}), now))
                db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, cid))
                mid = cur.lastrowid
        except sqlite3.IntegrityError as e:
            raise StorageError(f"{self.path}: cannot add a {role} message to conversation {cid} ({e}); "
                               "was it deleted?") from None
        return StoredMessage(mid, cid, role, content, meta or {}, now)

    def messages(self, cid: int) -> list[StoredMessage]:
        """Messages of a conversation in order."""
        return [self._msg(r) for r in self.db.execute(
            "SELECT id, conversation_id, role, content, meta, created FROM messages "
            "WHERE conversation_id = ? ORDER BY id", (cid,))]

    def delete_message(self, mid: int) -> None:
        """Delete one message (regenerate removes the reply it replaces)."""
        with self._tx() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (mid,))

    def recent_prompts(self, limit: int = 200) -> list[str]:
        """The last ``limit`` user prompts of all conversations, in the order they were sent.

        The newest prompt is LAST (the input box's ↑ walks the list from its end, as a shell
        does); adjacent duplicates are collapsed into one.
        """
        newest_first: list[str] = []
        for (text,) in self.db.execute("SELECT content FROM messages WHERE role = 'user' ORDER BY id DESC"):
            if len(newest_first) >= limit:
                break
            if not newest_first or newest_first[-1] != text:
                newest_first.append(text)
        return newest_first[::-1]

    def iter_all_messages(self) -> Iterator[StoredMessage]:
        """Every message of every conversation (for checks and exports)."""
        for r in self.db.execute("SELECT id, conversation_id, role, content, meta, created FROM messages ORDER BY id"):
            yield self._msg(r)

    def integrity_ok(self) -> bool:
        """True when SQLite's ``PRAGMA integrity_check`` reports ``ok``."""
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def conversation_markdown(conv: Conversation, messages: list[StoredMessage]) -> str:
    """A conversation as a Markdown document (title, settings, then each message)."""
    lines = [f"# {conv.title}", "", f"- model: `{conv.model}` ({conv.backend})"]
    if conv.params:
        lines.append("- sampling: " + ", ".join(f"{k}={v}" for k, v in sorted(conv.params.items())))
    lines.append(f"- exported: {time.strftime('%Y-%m-%d %H:%M', time.localtime())}")
    lines.append("")
    if conv.system_prompt:
        lines += ["## System", "", conv.system_prompt, ""]
    for m in messages:
        lines += [f"## {m.role.capitalize()}", "", m.content.rstrip(), ""]
        if m.meta.get("finish_reason") == "cancelled":
            lines += ["*(stopped)*", ""]
    return "\n".join(lines).rstrip() + "\n"


def export_markdown(conv: Conversation, messages: list[StoredMessage], folder: str | os.PathLike) -> Path:
    """Write the conversation to ``folder/<title>-<id>.md`` atomically and return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in conv.title.lower()).strip("-")[:40] or "chat"
    out = folder / f"{slug}-{conv.id}.md"
    text = conversation_markdown(conv, messages)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out
