"""The chat database: CRUD, search, export, and surviving a ``kill -9`` in the middle of a generation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from edgeinfer.storage import ChatStore, StorageError, conversation_markdown, default_db_path, export_markdown

# The child writes a conversation through the storage layer the way the app does: the user
# message is committed, then a reply is "generated" token by token in memory and committed when
# complete. It prints the id of each committed message, then keeps generating until killed.
CHILD = textwrap.dedent(r"""
    import sys, time
    from edgeinfer.storage import ChatStore
    store = ChatStore(sys.argv[1])
    conv = store.create_conversation("crash test")
    print("conv", conv.id, flush=True)
    i = 0
    while True:
        u = store.add_message(conv.id, "user", f"question {i}")
        print("committed", u.id, f"question {i}", flush=True)
        reply = ""
        for t in range(200):              # the generation in progress
            reply += f"tok{t} "
            if t % 50 == 0:
                time.sleep(0.001)
        a = store.add_message(conv.id, "assistant", f"answer {i}: " + reply, {"finish_reason": "stop"})
        print("committed", a.id, f"answer {i}", flush=True)
        i += 1
""")


def test_kill_9_mid_generation_loses_no_completed_message(tmp_path):
    db = tmp_path / "chat.sqlite3"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, text=True, env=env)
    committed: dict[int, str] = {}
    try:
        conv_line = p.stdout.readline().split()
        assert conv_line[0] == "conv", conv_line
        while len(committed) < 60:
            line = p.stdout.readline()
            assert line, "child died early"
            _, mid, label = line.rstrip("\n").split(" ", 2)
            committed[int(mid)] = label
    finally:
        os.kill(p.pid, signal.SIGKILL)  # a real kill -9, while the child is writing
        p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    # whatever the child printed after our last read is also committed; read it too
    for line in p.stdout.read().splitlines():
        if line.startswith("committed"):
            _, mid, label = line.split(" ", 2)
            committed[int(mid)] = label
    assert (tmp_path / "chat.sqlite3-wal").exists() or db.exists()
    store = ChatStore(db)
    assert store.integrity_ok()
    stored = {m.id: m for m in store.iter_all_messages()}
    missing = [mid for mid in committed if mid not in stored]
    print(f"child committed {len(committed)} messages before kill -9; stored {len(stored)}; missing {len(missing)}")
    assert not missing
    for mid, label in committed.items():
        assert stored[mid].content.startswith(label)
    # no half-written reply: every stored assistant message is complete
    for m in stored.values():
        if m.role == "assistant":
            assert m.content.rstrip().endswith("tok199"), m.content[-30:]
    # and the database is still writable
    store.add_message(int(conv_line[1]), "user", "after the crash")
    store.close()


def test_crud_search_and_cascade(tmp_path):
    s = ChatStore(tmp_path / "c.db")
    a = s.create_conversation("Cooking", system_prompt="chef", model="m1", backend="torch", params={"top_k": 5})
    b = s.create_conversation("Travel")
    s.add_message(a.id, "user", "how long to boil an egg?")
    s.add_message(b.id, "user", "cheapest 100% train to Rome_city")
    assert [c.title for c in s.list_conversations()] == ["Travel", "Cooking"]
    assert [c.title for c in s.list_conversations("EGG")] == ["Cooking"]
    assert [c.title for c in s.list_conversations("100%")] == ["Travel"]  # % and _ are literal
    assert [c.title for c in s.list_conversations("0%_t")] == []
    a2 = s.update_conversation(a.id, title="Eggs", params={"temperature": 0.1})
    assert (a2.title, a2.system_prompt, a2.model, a2.backend, a2.params) == ("Eggs", "chef", "m1", "torch",
                                                                            {"temperature": 0.1})
    with pytest.raises(ValueError):
        s.update_conversation(a.id, created=0)
    s.delete_conversation(a.id)
    assert [m.conversation_id for m in s.iter_all_messages()] == [b.id]
    with pytest.raises(StorageError, match="no conversation"):
        s.get_conversation(a.id)
    mode = s.db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_export_markdown_is_atomic_and_complete(tmp_path):
    s = ChatStore(tmp_path / "c.db")
    c = s.create_conversation("A/B test: results?", system_prompt="Be terse.", params={"temperature": 0.2})
    s.add_message(c.id, "user", "hi")
    s.add_message(c.id, "assistant", "hello", {"finish_reason": "cancelled"})
    out = export_markdown(c, s.messages(c.id), tmp_path / "out")
    assert out.name == f"a-b-test--results-{c.id}.md"
    text = out.read_text()
    assert text == conversation_markdown(c, s.messages(c.id))
    for part in ("# A/B test: results?", "## System\n\nBe terse.", "## User\n\nhi", "## Assistant\n\nhello",
                 "*(stopped)*", "temperature=0.2"):
        assert part in text
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "chat.sqlite3"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="cannot open the chat database.*EDGEINFER_DATA_DIR"):
        ChatStore(bad)


def test_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_DATA_DIR", str(tmp_path / "data"))
    assert default_db_path() == tmp_path / "data" / "chat.sqlite3"
    s = ChatStore()
    assert s.path.is_file()
    s.close()


def test_recent_prompts_newest_last_across_conversations(tmp_path):
    """The ↑ history: user prompts of all conversations in the order they were sent (the input
    box walks it from the end, so ↑ gives the newest first), adjacent duplicates collapsed."""
    s = ChatStore(tmp_path / "c.db")
    old, new = s.create_conversation("old"), s.create_conversation("new")
    s.add_message(old.id, "user", "old 1")
    s.add_message(old.id, "assistant", "reply")
    s.add_message(new.id, "user", "new 1")
    s.add_message(old.id, "user", "old 2")  # the old conversation continued after "new 1"
    s.add_message(new.id, "user", "again")
    s.add_message(new.id, "user", "again")
    s.add_message(old.id, "user", "again")
    got = s.recent_prompts()
    print(got)
    assert got == ["old 1", "new 1", "old 2", "again"]
    assert s.recent_prompts(limit=2) == ["old 2", "again"]
