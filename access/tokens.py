"""API tokens: made for a user (never outranking or outlasting the token that made one) and revoked."""

from datetime import timedelta

from werkzeug.exceptions import Forbidden

from models import (
    ROLES,
    ApiToken,
    canonical_username,
    db,
    is_canonical_id,
    lower_role,
    new_id,
    new_token_secret,
    token_digest,
    utcnow,
)
from observability import audit
from storage.tokens import add_token, delete_token
from storage.users import user_named


def find_owner(username):
    """The user named `username` (in any Unicode form of the name), or None."""
    return user_named(canonical_username(username))


def create_token(owner, name, role=None, expires_in_days=None, made_with=None):
    """A new token of `owner` (a User) as its answer, secret included; its role at most the
    owner's. One `made_with` another token (an ApiToken) has at most that token's role and
    expires no later than it (by default when it does), so a token cannot outlast or
    outrank the token that made it."""
    ceiling = owner.role if made_with is None else lower_role(owner.role, made_with.role)
    role = role or ceiling
    if ROLES.index(role) > ROLES.index(owner.role):
        raise Forbidden(f"A token's role is at most its owner's; {owner.username} is {owner.role}.")
    if ROLES.index(role) > ROLES.index(ceiling):
        raise Forbidden(f"A token made with a token has at most that token's role, {made_with.role}.")
    created_at = utcnow()
    expires_at = created_at + timedelta(days=expires_in_days) if expires_in_days else None
    if made_with is not None and made_with.expires_at is not None:
        if expires_at is not None and expires_at > made_with.expires_at:
            raise Forbidden(f"A token made with a token expires no later than it: {made_with.expires_at.isoformat()}Z.")
        expires_at = expires_at or made_with.expires_at
    secret = new_token_secret()
    token = ApiToken(
        id=new_id(),
        user_id=owner.id,
        name=name,
        role=role,
        digest=token_digest(secret),
        created_at=created_at,
        expires_at=expires_at,
    )
    add_token(token)
    audit.record("token.create", token.id, ["name", "role", "expires_at"], detail=f"for {owner.username}, role {role}")
    db.session.commit()
    return {
        "id": token.id,
        "name": token.name,
        "user": owner.username,
        "role": token.role,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "last_used_at": None,
        "token": secret,
    }


def revoke_token(token_id, owner_id=None):
    """Delete a token (only of `owner_id`, when given); False when there was none."""
    if not is_canonical_id(token_id):
        return False
    if not delete_token(token_id, owner_id):
        db.session.rollback()
        return False
    audit.record("token.revoke", token_id)
    db.session.commit()
    return True
