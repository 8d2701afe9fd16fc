"""Password hashing, roles and permissions, user accounts, and the `users` CLI."""
from __future__ import annotations

import io
import json

import pytest

from leaml import auth
from leaml.cli import main as cli
from leaml.store import NotFoundError, connect
from leaml.store import users


# --- auth: hashing --------------------------------------------------------------------------

def test_hash_password_format_and_check():
    encoded = auth.hash_password("correct horse")
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2 ** 14), "8", "1")
    assert len(bytes.fromhex(salt)) == 16 and len(bytes.fromhex(digest)) == 32
    assert "correct horse" not in encoded
    assert auth.check_password("correct horse", encoded)
    assert not auth.check_password("correct horsE", encoded)
    assert auth.hash_password("correct horse") != encoded  # fresh salt every time


@pytest.mark.parametrize("encoded", ["", "plain", "scrypt$1$2$3", "bcrypt$1$1$1$aa$bb",
                                     "scrypt$16384$8$1$zz$zz", None])
def test_check_password_malformed_is_a_mismatch(encoded):
    assert auth.check_password("whatever1", encoded) is False


# --- auth: roles ----------------------------------------------------------------------------

def _user(role, name="u", **kw):
    return {"name": name, "role": role, "disabled": 0, **kw}


def test_permissions_per_role():
    assert auth.can(_user("admin"), "admin") and auth.can(_user("admin"), "train")
    assert auth.can(_user("expert"), "train") and not auth.can(_user("expert"), "admin")
    assert auth.can(_user("annotator"), "review") and not auth.can(_user("annotator"), "label")
    assert auth.can(_user("viewer"), "view") and not auth.can(_user("viewer"), "review")
    assert not auth.can(None, "view")
    assert not auth.can(_user("admin", disabled=1), "view")


def test_require_messages_say_whom_to_ask():
    ann = _user("annotator", "ann")
    assert auth.require(ann, "review") is ann
    with pytest.raises(PermissionError) as err:
        auth.require(ann, "train")
    assert str(err.value) == "annotator 'ann' may not train; ask an expert or admin"
    with pytest.raises(PermissionError, match="^expert 'doc' may not manage users and settings; "
                                              "ask an admin$"):
        auth.require(_user("expert", "doc"), "admin")
    with pytest.raises(PermissionError, match="^viewer 'pi' may not review; ask an expert, "
                                              "annotator or admin$"):
        auth.require(_user("viewer", "pi"), "review")
    with pytest.raises(PermissionError, match="nobody is signed in"):
        auth.require(None, "view")
    with pytest.raises(PermissionError, match="disabled"):
        auth.require(_user("admin", "root", disabled=1), "view")
    with pytest.raises(ValueError, match="unknown permission"):
        auth.require(ann, "fly")


# --- store: accounts ------------------------------------------------------------------------

def test_add_verify_list_count(db):
    assert users.count_users(db) == 0
    ann = users.add_user(db, "ann", "s3cret-pw", "annotator", by="root")
    assert set(ann) == {"id", "name", "role", "created_at", "disabled"}  # never the hash
    assert users.verify_password(db, "ann", "s3cret-pw")["role"] == "annotator"
    assert users.verify_password(db, "ann", "wrong-pw!") is None
    assert users.verify_password(db, "nobody", "s3cret-pw") is None
    users.add_user(db, "bob", "another-pw", "viewer")
    assert [u["name"] for u in users.list_users(db)] == ["ann", "bob"]
    assert all("pw_hash" not in u for u in users.list_users(db))
    assert users.count_users(db) == 2
    stored = db.execute("SELECT pw_hash FROM users WHERE name = 'ann'").fetchone()[0]
    assert stored.startswith("scrypt$") and "s3cret-pw" not in stored


def test_add_user_rejects_bad_input(db):
    with pytest.raises(ValueError, match="too short: use at least 8"):
        users.add_user(db, "ann", "short", "annotator")
    with pytest.raises(ValueError, match="unknown role 'boss': use one of admin, expert"):
        users.add_user(db, "ann", "long-enough", "boss")
    with pytest.raises(ValueError, match="user name"):
        users.add_user(db, " ", "long-enough", "viewer")
    users.add_user(db, "ann", "long-enough", "viewer")
    with pytest.raises(ValueError, match="already exists"):
        users.add_user(db, "ann", "long-enough", "viewer")
    assert users.count_users(db) == 1


def test_set_role_password_disable_are_audited_without_passwords(db):
    users.add_user(db, "ann", "first-password", "annotator", by="root")
    assert users.set_role(db, "ann", "expert", by="root")["role"] == "expert"
    users.set_password(db, "ann", "second-password", by="root")
    assert users.verify_password(db, "ann", "first-password") is None
    assert users.verify_password(db, "ann", "second-password")["role"] == "expert"
    users.set_disabled(db, "ann", by="root")
    assert users.verify_password(db, "ann", "second-password") is None
    with pytest.raises(NotFoundError, match="unknown user 'bob'"):
        users.set_role(db, "bob", "viewer")
    events = list(db.query("SELECT * FROM events WHERE entity = 'user' ORDER BY id"))
    assert [e["action"] for e in events] == ["user.create", "user.role", "user.password",
                                             "user.disable"]
    dump = json.dumps(events)
    assert "password" not in dump.replace("user.password", "") and "scrypt" not in dump


def test_require_user_loads_by_name(db):
    users.add_user(db, "ann", "long-enough", "annotator")
    assert users.require_user(db, "ann", "review")["name"] == "ann"
    with pytest.raises(PermissionError, match="may not train"):
        users.require_user(db, "ann", "train")
    with pytest.raises(PermissionError, match="unknown user"):
        users.require_user(db, "ghost", "view")


# --- CLI ------------------------------------------------------------------------------------

def _cli(home, monkeypatch, *argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return cli.main([*argv, "--home", str(home)])


def test_cli_users_add_list_set_role_passwd(home, monkeypatch, capsys):
    assert _cli(home, monkeypatch, "users", "add", "ann", "--role", "annotator",
                "--password-stdin", stdin="pass-word-1\n") == 0
    assert _cli(home, monkeypatch, "users", "list") == 0
    out = capsys.readouterr().out
    assert "ann" in out and "annotator" in out and "pass-word-1" not in out
    assert _cli(home, monkeypatch, "users", "set-role", "ann", "expert") == 0
    assert _cli(home, monkeypatch, "users", "passwd", "ann", "--password-stdin",
                stdin="pass-word-2\n") == 0
    assert _cli(home, monkeypatch, "users", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(u["name"], u["role"]) for u in listed] == [("ann", "expert")]
    assert users.verify_password(connect(home), "ann", "pass-word-2")


def test_cli_users_errors(home, monkeypatch, capsys):
    assert _cli(home, monkeypatch, "users", "add", "ann", "--role", "annotator",
                "--password-stdin", stdin="short\n") == cli.EXIT_USAGE
    assert "at least 8" in capsys.readouterr().err
    assert _cli(home, monkeypatch, "users", "set-role", "ghost", "viewer") == cli.EXIT_USAGE
    assert "unknown user 'ghost'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(home, monkeypatch, "users", "add", "ann", "--role", "boss", "--password-stdin")
    assert "invalid choice: 'boss'" in capsys.readouterr().err
    assert users.count_users(connect(home)) == 0
