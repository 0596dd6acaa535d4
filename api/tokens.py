"""API tokens for programs, sent as `Authorization: Bearer <token>`: /api/v1/tokens."""

from datetime import timedelta

from apifairy import arguments, authenticate, body, other_responses, response
from flask import Blueprint
from marshmallow import ValidationError
from werkzeug.exceptions import Forbidden, NotFound

from access.auth import auth
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
from schemas import NewTokenSchema, TokenCreateSchema, TokenSchema, TokensQuerySchema, collection
from storage.tokens import add_token, delete_token, token_by_id, tokens_page
from storage.users import user_by_id, user_named

tokens_bp = Blueprint("tokens", __name__)


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


def owner_for(caller, username):
    """Whom a token asked for by `caller` belongs to: the caller, or (admin only) the named user."""
    if username is not None and canonical_username(username) != caller.username:
        if caller.role != "admin":
            raise Forbidden("Only an admin may create a token for another user.")
        owner = find_owner(username)
        if owner is None:
            raise ValidationError({"user": [f"No user named {username!r}."]})
        return owner
    owner = user_by_id(caller.id)
    if owner is None:  # deleted since its password was verified
        raise Forbidden("Your user no longer exists.")
    return owner


@tokens_bp.route("/tokens", methods=["POST"])
@authenticate(auth, role="reader")
@body(TokenCreateSchema)
@response(NewTokenSchema, 201)
def create(request_fields):
    """Create an API token

    The answer holds the secret (`token`, sent as `Authorization: Bearer <token>`); it is
    shown this once, since the registry keeps only a digest of it. The token acts with its
    role, never more than its owner's current role. A token made with another token (sent
    as the Bearer credential) has at most that token's role and expires no later than it
    (by default, when it does).
    """
    caller = auth.current_user()
    owner = owner_for(caller, request_fields.get("user"))
    made_with = None
    if caller.token_id is not None:
        made_with = token_by_id(caller.token_id)
        if made_with is None:
            raise Forbidden("The token you sent was revoked meanwhile.")
    return create_token(
        owner,
        request_fields["name"],
        request_fields.get("role"),
        request_fields.get("expires_in_days"),
        made_with=made_with,
    )


@tokens_bp.route("/tokens", methods=["GET"])
@authenticate(auth, role="reader")
@arguments(TokensQuerySchema)
@response(collection(TokenSchema, paged=True))
def list_all(query):
    """List API tokens, newest first

    Your own tokens; an admin sees everyone's (`user` narrows them to one user's).
    Expired tokens stay listed until revoked.
    """
    caller, username = auth.current_user(), query.get("user")
    if username is not None:
        username = canonical_username(username) or username  # a name no user can have lists nothing
    if caller.role != "admin":
        if username not in (None, caller.username):
            raise Forbidden("Only an admin may list another user's tokens.")
        username = caller.username
    filter_values = {"user": username} if username else {}
    return tokens_page(filter_values, query["limit"], query.get("page_token"))


@tokens_bp.route("/tokens/<token_id>", methods=["DELETE"])
@authenticate(auth, role="reader")
@other_responses({404: "No such token among those you may revoke"})
def delete(token_id):
    """Revoke an API token (yours; an admin may revoke anyone's)

    It stops working at once, in every worker and instance.
    """
    caller = auth.current_user()
    if not revoke_token(token_id, None if caller.role == "admin" else caller.id):
        raise NotFound(f"You have no token with id {token_id!r}.")
    return "", 204
