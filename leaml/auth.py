"""Password hashing and role permissions. Pure functions: no database, no Streamlit.

Passwords are stored only as ``scrypt$n$r$p$salt_hex$hash_hex`` (hashlib.scrypt with a
random 16-byte salt per user), checked in constant time. Roles map to sets of permissions;
the app and library functions call :func:`require` before doing what a permission guards.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

ROLES = ("admin", "expert", "annotator", "viewer")
MIN_PASSWORD_LENGTH = 8
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32

# what each role may do; 'admin' as a permission means user accounts and project settings
PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"view", "review", "label", "train", "import", "export", "admin"}),
    "expert": frozenset({"view", "review", "label", "train", "import", "export"}),
    "annotator": frozenset({"view", "review"}),
    "viewer": frozenset({"view", "export"}),
}
ALL_PERMISSIONS = frozenset().union(*PERMISSIONS.values())
# how a refusal reads: "annotator 'ann' may not <verb>"
_VERBS = {"admin": "manage users and settings", "import": "import data", "label": "label",
          "review": "review", "train": "train", "view": "view", "export": "export"}


def hash_password(password: str) -> str:
    """Encode ``password`` as ``scrypt$n$r$p$salt_hex$hash_hex`` with a fresh random salt."""
    if not isinstance(password, str) or not password:
        raise ValueError("password is empty; choose one of at least "
                         f"{MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches an encoding made by :func:`hash_password`.

    The parameters come from the encoding itself, so hashes made with other scrypt costs
    still verify. A malformed encoding is simply a mismatch (never an exception).
    """
    try:
        scheme, n, r, p, salt_hex, hash_hex = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(hash_hex)
        digest = _scrypt(password, bytes.fromhex(salt_hex), int(n), int(r), int(p),
                         dklen=len(expected))
    except (AttributeError, ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int = HASH_BYTES) -> bytes:
    # maxmem: n=2**14, r=8 needs 16 MiB; leave headroom above OpenSSL's 32 MiB default
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=128 * r * n * 2 + 1024 * 1024, dklen=dklen)


def validate_password(password: str) -> str:
    """Return ``password`` if it is long enough, else raise ValueError saying what is needed."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password too short: use at least {MIN_PASSWORD_LENGTH} characters")
    return password


def validate_role(role: str) -> str:
    """Return ``role`` if it is one of :data:`ROLES`, else raise ValueError listing them."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def can(user: dict | None, perm: str) -> bool:
    """Whether ``user`` (a users row as a dict, or None when nobody is signed in) may ``perm``."""
    _check_perm(perm)
    if not user or user.get("disabled"):
        return False
    return perm in PERMISSIONS.get(user.get("role"), frozenset())


def require(user: dict | None, perm: str) -> dict:
    """Return ``user`` if it may ``perm``; else raise PermissionError saying whom to ask.

    Example message: ``annotator 'ann' may not train; ask an expert or admin``.
    """
    _check_perm(perm)
    if not user:
        raise PermissionError(f"nobody is signed in; sign in as {_who_may(perm)} to {_VERBS[perm]}")
    name, role = user.get("name"), user.get("role")
    if user.get("disabled"):
        raise PermissionError(f"user '{name}' is disabled; ask an admin to enable the account")
    if not can(user, perm):
        raise PermissionError(f"{role} '{name}' may not {_VERBS[perm]}; ask {_who_may(perm)}")
    return user


def _check_perm(perm: str) -> None:
    if perm not in ALL_PERMISSIONS:
        raise ValueError(f"unknown permission {perm!r}: use one of {', '.join(sorted(ALL_PERMISSIONS))}")


def _who_may(perm: str) -> str:
    """'an expert or admin': the roles holding ``perm``, admin last, with an article."""
    roles = [r for r in ROLES[1:] if perm in PERMISSIONS[r]] + ["admin"]
    text = roles[0] if len(roles) == 1 else f"{', '.join(roles[:-1])} or {roles[-1]}"
    return ("an " if text[0] in "aeiou" else "a ") + text
