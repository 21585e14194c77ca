"""Password hashes: argon2id (argon2-cffi); werkzeug hashes made before it still verify."""
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from werkzeug.security import check_password_hash

# argon2-cffi's defaults: RFC 9106's low-memory profile (t=3, 64 MiB, p=4), ~0.15 s here.
_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    """Whether `password` matches `stored_hash` (argon2, or an older werkzeug hash)."""
    if stored_hash.startswith("$argon2"):
        try:
            return _hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):
            return False
    try:
        return check_password_hash(stored_hash, password)
    except (ValueError, TypeError, AttributeError):  # not a hash at all (e.g. a placeholder)
        return False


def needs_rehash(stored_hash: str) -> bool:
    """A werkzeug hash, or argon2 with other parameters: replace it at the next good login."""
    return not stored_hash.startswith("$argon2") or _hasher.check_needs_rehash(stored_hash)


# A hash with the same parameters as _hasher's, made once: verifying against it costs what a real check costs.
_DUMMY_HASH = "$argon2id$v=19$m=65536,t=3,p=4$Yqs3eC1HSt6D5+Y1NSuVtA$3Xm1cRgg3oFRxdGJp7xmQaPOR5mLTzimW9e0rtLfrqs"


def burn_verification(password: str) -> None:
    """Spend what a real check costs, so an unknown address answers as slowly as a known one."""
    verify_password(_DUMMY_HASH, password)
