"""Operator commands: `flask --app app users ...`, `tokens ...`, `usage`, `registry sync` and `keys rotate`."""

import logging
import logging.config
import os
import secrets
import sys
from functools import partial

import click
import sqlalchemy as sa
from flask import current_app
from flask.cli import AppGroup, ScriptInfo, with_appcontext
from marshmallow import ValidationError
from werkzeug.exceptions import Forbidden
from werkzeug.security import generate_password_hash

from access.crypto import UnopenableApiKey, cipher
from access.tokens import create_token, find_owner, revoke_token
from api.errors import SyncInProgress
from catalog.manifests import sync_manifests
from models import ROLES, USERNAME_MAX_LENGTH, User, canonical_username, db
from observability import audit
from observability.logs import command_logging_config, escape
from observability.usage_report import usage_report
from schemas import MAX_TOKEN_DAYS, USAGE_GROUP_KEYS, TokenCreateSchema, UsageQuerySchema, UsageRowSchema
from storage.providers import replace_sealed_api_key, sealed_api_keys
from storage.tokens import tokens_page
from storage.usage import DAY_SUMS, GROUP_FIELDS
from storage.users import (
    add_user,
    any_user_exists,
    remove_user,
    set_password_hash,
    user_named,
    usernames_and_roles,
    users_table_exists,
)

log = logging.getLogger("registry")
users_cli = AppGroup("users", help="Manage the users who may call the API.")
registry_cli = AppGroup("registry", help="Providers declared in manifests (REGISTRY_MANIFESTS).")
keys_cli = AppGroup("keys", help="Manage the encryption of the stored API keys.")
tokens_cli = AppGroup("tokens", help="Manage the API tokens programs call the API with.")


def read_password(from_stdin):
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("The password must not be empty.")
    return password


def check_username(username):
    """The name as stored (NFC), or refused when no user can have it."""
    canonical = canonical_username(username)
    if canonical is None:
        raise click.ClickException(
            f"A user name is 1 to {USERNAME_MAX_LENGTH} characters, without ':' or control characters."
        )
    return canonical


def change_user(change, username, action, changed_fields=()):
    """Run `change` (a storage.users function of the user's name, True when it found the
    user) on the user named `username`, audit it and commit; an error when there is none."""
    canonical = canonical_username(username)
    if canonical is None or not change(canonical):
        raise click.ClickException(f"No user named {username!r}.")
    audit.record(action, canonical, changed_fields)
    db.session.commit()


def find_user(username):
    user = find_owner(username)
    if user is None:
        raise click.ClickException(f"No user named {username!r}.")
    return user


def write_private_file(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as private_file:
        private_file.write(text)


def create_first_admin(app):
    """Create the admin named by REGISTRY_ADMIN_USERNAME when the database has no user;
    without REGISTRY_ADMIN_PASSWORD its password is generated into <instance>/admin-password."""
    if any_user_exists():
        return
    generated = app.config["ADMIN_PASSWORD"] is None
    password = secrets.token_urlsafe(18) if generated else app.config["ADMIN_PASSWORD"]
    admin = User(username=app.config["ADMIN_USERNAME"], role="admin")
    admin.set_password(password)
    add_user(admin)
    try:
        audit.record("user.create", admin.username, ["role", "password"], detail="the first admin")
        db.session.commit()
    except sa.exc.IntegrityError:  # another instance starting at once created it first
        db.session.rollback()
        return
    if generated:
        path = os.path.join(app.instance_path, "admin-password")
        write_private_file(path, password + "\n")
        log.warning("created admin user %r; its generated password is in %s", admin.username, path)
    else:
        log.warning("created admin user %r from REGISTRY_ADMIN_PASSWORD", admin.username)


@users_cli.command("bootstrap")
def bootstrap():
    """Create the first admin when there is no user yet (`make run` runs this after `db upgrade`)."""
    if not users_table_exists():
        raise click.ClickException("The database has no schema yet: run `flask --app app db upgrade` first.")
    create_first_admin(current_app)


@users_cli.command("create")
@click.argument("username")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
def create_user(username, role, password_stdin):
    """Create a user with a role."""
    username = check_username(username)
    if user_named(username) is not None:
        raise click.ClickException(f"A user named {username!r} already exists.")
    user = User(username=username, role=role)
    user.set_password(read_password(password_stdin))
    add_user(user)
    audit.record("user.create", username, ["role", "password"], detail=f"role {role}")
    db.session.commit()
    click.echo(f"Created {role} {username}.")


@users_cli.command("list")
def list_users():
    """List users and their roles."""
    for username, role in usernames_and_roles():
        click.echo(f"{username}\t{role}")


@users_cli.command("set-password")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
def set_password(username, password_stdin):
    """Change a user's password."""
    find_user(username)  # before asking for a password
    password_hash = generate_password_hash(read_password(password_stdin))
    change_user(partial(set_password_hash, password_hash=password_hash), username, "user.update", ["password"])
    click.echo(f"Changed the password of {username}.")


@users_cli.command("set-role")
@click.argument("username")
@click.argument("role", type=click.Choice(ROLES))
def set_role(username, role):
    """Change a user's role; the user's tokens act with at most the new role from the next request."""
    user = find_user(username)
    user.role = role
    audit.record("user.update", username, ["role"], detail=f"role {role}")
    db.session.commit()
    click.echo(f"{username} is now {role}.")


@users_cli.command("delete")
@click.argument("username")
def delete_user(username):
    """Delete a user, and the user's API tokens (the database cascades the deletion)."""
    change_user(remove_user, username, "user.delete")
    click.echo(f"Deleted {username}.")


@tokens_cli.command("create")
@click.argument("name")
@click.option("--user", "username", required=True, help="The token's owner.")
@click.option("--role", type=click.Choice(ROLES), help="At most the owner's role; default: the owner's.")
@click.option("--expires-in-days", type=click.IntRange(1, MAX_TOKEN_DAYS), help="Default: never expires.")
def create_api_token(name, username, role, expires_in_days):
    """Create an API token and print its secret, this once."""
    name_errors = TokenCreateSchema().validate({"name": name}).get("name")
    if name_errors:
        raise click.ClickException(f"Invalid token name: {' '.join(name_errors)}")
    try:
        token = create_token(find_user(username), name, role, expires_in_days)
    except Forbidden as error:
        raise click.ClickException(error.description) from None
    click.echo(f"Created token {token['id']} ({token['role']}) for {username}; it is shown this once:", err=True)
    click.echo(token["token"])


@tokens_cli.command("list")
@click.option("--user", "username", help="Only this user's tokens.")
def list_api_tokens(username):
    """List API tokens, newest first: id, name, user, role, created, expires, last used."""
    filters = {"user": find_user(username).username} if username else {}
    page_token = None
    while True:
        page = tokens_page(filters, 1000, page_token)
        for token in page["items"]:
            times = (token.created_at, token.expires_at, token.last_used_at)
            shown_times = [f"{time:%Y-%m-%dT%H:%M:%SZ}" if time else "-" for time in times]
            # Escaped: a name stored before names had to be printable could rewrite the terminal.
            click.echo("\t".join([token.id, escape(token.name), token.user, token.role, *shown_times]))
        if not page["has_more"]:
            return
        page_token = page["next_page_token"]


@tokens_cli.command("revoke")
@click.argument("token_id")
def revoke_api_token(token_id):
    """Revoke (delete) an API token; it stops working at once."""
    if not revoke_token(token_id):
        raise click.ClickException(f"No token has id {token_id!r}.")
    click.echo(f"Revoked token {token_id}.")


def usage_query(options):
    """The command's options as a loaded UsageQuerySchema, or the error naming the wrong ones."""
    try:
        return UsageQuerySchema().load({name: value for name, value in options.items() if value is not None})
    except ValidationError as error:
        wrong = (f"--{name.replace('_', '-')}: {' '.join(messages)}" for name, messages in error.messages.items())
        raise click.ClickException("; ".join(wrong)) from None


@click.command("usage")
@click.option("--group-by", help=f"One or more of {', '.join(USAGE_GROUP_KEYS)}, separated by commas; default day.")
@click.option("--since", help="RFC 3339; default: 30 days before --until, or before now.")
@click.option("--until", help="RFC 3339; default: no end.")
@click.option("--model", help="Only this registry model id.")
@click.option("--provider-id", help="Only this provider's calls.")
@click.option("--token-id", help="Only this API token's calls.")
@click.option("--user", help="Only this user's calls.")
@with_appcontext
def show_usage(**options):
    """Print the gateway's usage added up (everyone's): a header, then one tab-separated row per group."""
    query = usage_query(options)
    columns = [*(GROUP_FIELDS[key] for key in query["group_by"]), *DAY_SUMS]
    click.echo("\t".join(columns))
    for row in UsageRowSchema(many=True).dump(usage_report(query)["items"]):
        # Escaped: a model id is as an upstream listed it.
        click.echo("\t".join(escape("-" if row[name] is None else str(row[name])) for name in columns))


@registry_cli.command("sync")
def sync_registry():
    """Sync every configured manifest now; exit status 1 when any of them failed."""
    try:
        results = sync_manifests()
    except SyncInProgress as error:
        raise click.ClickException(str(error)) from None
    if not results:
        click.echo("No manifests are configured.")
    for result in results:
        click.echo(result.describe())
    if any(result.error for result in results):
        raise click.exceptions.Exit(1)


def reseal_api_key(provider_id, sealed_api_key):
    """Seal one stored key anew, unless a running server changed it meanwhile; True when done."""
    try:
        resealed_api_key = cipher.reseal(sealed_api_key)
    except UnopenableApiKey:
        message = f"The API key of model provider {provider_id} opens with none of the configured keys"
        raise click.ClickException(f"{message}; nothing was changed.") from None
    return replace_sealed_api_key(provider_id, sealed_api_key, resealed_api_key)


@keys_cli.command("rotate")
def rotate_keys():
    """Re-encrypt every stored API key under the first of REGISTRY_ENCRYPTION_KEYS.

    Afterwards the keys after the first are no longer needed and can be dropped.
    """
    stored = sealed_api_keys()
    resealed = sum(reseal_api_key(provider_id, sealed_api_key) for provider_id, sealed_api_key in stored)
    if resealed:
        audit.record(
            "keys.rotate", changed_fields=["api_key"], detail=f"re-encrypted {resealed} of {len(stored)} API keys"
        )
    db.session.commit()
    click.echo(f"Re-encrypted {resealed} of {len(stored)} stored API keys under the first configured key.")
    if resealed < len(stored):
        click.echo("The others changed meanwhile (sealed by a running server); run the command again.")


def built_by_flask_command():
    """Whether the `flask` command is building the app (not gunicorn, a test, or a program embedding it)."""
    command = click.get_current_context(silent=True)
    return command is not None and command.find_object(ScriptInfo) is not None


def register_commands(app):
    app.cli.add_command(users_cli)
    app.cli.add_command(registry_cli)
    app.cli.add_command(keys_cli)
    app.cli.add_command(tokens_cli)
    app.cli.add_command(show_usage)
    # gunicorn and an embedding program set up logging themselves; the command's lines follow LOG_FORMAT here.
    if built_by_flask_command():
        logging.config.dictConfig(command_logging_config(app.config["LOG_FORMAT"]))
