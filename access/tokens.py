"""API tokens: made for a user (never outranking or outlasting the token that made one) and revoked."""

from datetime import timedelta

from werkzeug.exceptions import Forbidden

from models import (
    ROLES,
    ApiToken,
    TokenLimits,
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
from storage.tokens import add_token, delete_token, set_token_limits, shown_token_by_id
from storage.users import user_named


def find_owner(username):
    """The user named `username` (in any Unicode form of the name), or None."""
    return user_named(canonical_username(username))


def limits_within_maker(limits, made_with):
    """The new token's limits: those asked for, each one not asked for taken from the token
    it is made with; one above that token's is refused."""
    if made_with is None:
        return limits
    ceiling = TokenLimits.of(made_with)
    looser = limits.looser_than(ceiling)
    if looser:
        bounds = ", ".join(f"{name} at most {getattr(ceiling, name)}" for name in looser)
        raise Forbidden(f"A token made with a token has limits no looser than it: {bounds}.")
    return limits.within(ceiling)


def limit_field_names(limits):
    return [f"limits.{name}" for name, value in limits.as_dict().items() if value is not None]


def create_token(owner, name, role=None, expires_in_days=None, made_with=None, limits=None):
    """A new token of `owner` (a User) as its answer, secret included; its role at most the
    owner's. One `made_with` another token (an ApiToken) has at most that token's role,
    expires no later than it (by default when it does) and has limits no looser than its
    (by default its), so a token cannot outlast, outrank or outspend the token that made it."""
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
    limits = limits_within_maker(limits or TokenLimits(), made_with)
    secret = new_token_secret()
    token = ApiToken(
        id=new_id(),
        user_id=owner.id,
        name=name,
        role=role,
        digest=token_digest(secret),
        created_at=created_at,
        expires_at=expires_at,
        **limits.as_dict(),
    )
    add_token(token)
    changed = ["name", "role", "expires_at", *limit_field_names(limits)]
    audit.record("token.create", token.id, changed, detail=f"for {owner.username}, role {role}")
    db.session.commit()
    return {
        "id": token.id,
        "name": token.name,
        "user": owner.username,
        "role": token.role,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "last_used_at": None,
        "limits": limits,
        "token": secret,
    }


def change_token_limits(token_id, changes):
    """Set the limits named in `changes` (a mapping; None: no limit), keep the others; the token
    as listed, or None when there is no such token."""
    token = shown_token_by_id(token_id) if is_canonical_id(token_id) else None
    if token is None:
        return None
    limits = TokenLimits.of(token.limits.as_dict() | changes)
    set_token_limits(token_id, limits)
    changed = [f"limits.{name}" for name in changes if changes[name] != getattr(token.limits, name)]
    audit.record("token.update", token_id, changed)
    db.session.commit()
    return token._replace(limits=limits)


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
