"""API tokens for programs, sent as `Authorization: Bearer <token>`: /api/v1/tokens."""

from apifairy import arguments, authenticate, body, other_responses, response
from flask import Blueprint
from marshmallow import ValidationError
from werkzeug.exceptions import Forbidden, NotFound

from access.auth import auth
from access.tokens import change_token_limits, create_token, find_owner, revoke_token
from models import TokenLimits, canonical_username
from schemas import (
    NewTokenSchema,
    TokenChangesSchema,
    TokenCreateSchema,
    TokenSchema,
    TokensQuerySchema,
    collection,
)
from storage.tokens import token_by_id, tokens_page
from storage.users import user_by_id

tokens_bp = Blueprint("tokens", __name__)


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
    as the Bearer credential) has at most that token's role, expires no later than it (by
    default, when it does) and has limits no looser than its (by default, its limits).

    `limits` bounds its gateway calls: a call over one is refused with 429 and Retry-After
    before any provider is called.
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
        limits=TokenLimits.of(request_fields.get("limits") or {}),
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


@tokens_bp.route("/tokens/<token_id>", methods=["PATCH"])
@authenticate(auth, role="admin")
@body(TokenChangesSchema)
@response(TokenSchema)
@other_responses({404: "No such token"})
def update(changes, token_id):
    """Change an API token's limits (admin)

    Each limit given is set (null: no limit), each one left out is kept. The calls already
    admitted count against the new limits.
    """
    token = change_token_limits(token_id, changes["limits"])
    if token is None:
        raise NotFound(f"No token has id {token_id!r}.")
    return token._asdict()  # a tuple would be taken for (body, status, headers)


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
