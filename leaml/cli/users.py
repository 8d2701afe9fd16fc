"""The ``users`` subcommand (registered in leaml/cli/main.py's ADDERS): add, list, set-role, passwd.

Passwords are read from one line of stdin (``--password-stdin``) or prompted for twice with
getpass; they are never taken as an argument (it would land in shell history and ``ps``)
and never printed.
"""
from __future__ import annotations

import argparse
import getpass
import sys

from leaml import auth
from leaml.cli.common import CLI_ACTOR, print_json
from leaml.store import connect
from leaml.store import users as users_store


def _add_users(sub, common) -> None:
    text = "add, list, set-role, passwd: user accounts and their roles"
    p = sub.add_parser("users", help=text, description=text, parents=[common])
    actions = p.add_subparsers(dest="users_action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a user", parents=[common])
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=auth.ROLES, help="what the user may do")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from one line of stdin instead of prompting")
    ls = actions.add_parser("list", help="list users (name, role, created)", parents=[common])
    ls.add_argument("--json", action="store_true", help="print one JSON list")
    role = actions.add_parser("set-role", help="change a user's role", parents=[common])
    role.add_argument("name")
    role.add_argument("role", choices=auth.ROLES)
    pw = actions.add_parser("passwd", help="set a new password for a user", parents=[common])
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from one line of stdin instead of prompting")
    p.set_defaults(func=cmd_users)


def _read_password(from_stdin: bool, name: str) -> str:
    """One line of stdin, or a getpass prompt typed twice; ValueError if too short or unequal."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the two passwords differ; nothing changed, try again")
    return auth.validate_password(password)


def cmd_users(args: argparse.Namespace) -> int:
    db = connect(args.home)
    if args.users_action == "add":
        user = users_store.add_user(db, args.name, _read_password(args.password_stdin, args.name),
                                    args.role, by=CLI_ACTOR)
        print(f"added {user['role']} '{user['name']}'")
    elif args.users_action == "list":
        _print_list(users_store.list_users(db), as_json=args.json)
    elif args.users_action == "set-role":
        user = users_store.set_role(db, args.name, args.role, by=CLI_ACTOR)
        print(f"'{user['name']}' is now {user['role']}")
    elif args.users_action == "passwd":
        users_store.get_user(db, args.name)  # unknown name: fail before asking for a password
        users_store.set_password(db, args.name, _read_password(args.password_stdin, args.name),
                                 by=CLI_ACTOR)
        print(f"password of '{args.name}' changed")
    return 0


def _print_list(users: list[dict], *, as_json: bool) -> None:
    rows = [{"name": u["name"], "role": u["role"], "created": u["created_at"][:19] + "Z",
             "disabled": bool(u["disabled"])} for u in users]
    if as_json:
        print_json(rows)
        return
    if not rows:
        print("no users yet; add one with `python -m leaml users add NAME --role admin`")
        return
    width = max(4, *(len(r["name"]) for r in rows))
    print(f"{'NAME':<{width}}  {'ROLE':<9}  CREATED")
    for r in rows:
        flag = "  (disabled)" if r["disabled"] else ""
        print(f"{r['name']:<{width}}  {r['role']:<9}  {r['created']}{flag}")
