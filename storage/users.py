"""Users: the credentials every Basic login reads, and the CLI's user administration."""

import sqlalchemy as sa

from models import USERS, User, db
from storage.connections import DirectStatement

CREDENTIALS_BY_USERNAME = DirectStatement(
    sa.select(USERS.c.id, USERS.c.username, USERS.c.password_hash, USERS.c.role).where(
        USERS.c.username == sa.bindparam("username")
    )
)


def credentials_of(username):
    """(id, username, password_hash, role) of the user named `username` (canonical), or None."""
    return CREDENTIALS_BY_USERNAME.first(username=username)


def user_named(username):
    """The User named `username` (canonical), in the session, or None."""
    return db.session.scalar(sa.select(User).where(User.username == username))


def user_by_id(user_id):
    return db.session.get(User, user_id)


def any_user_exists():
    return db.session.scalar(sa.select(USERS.c.id).limit(1)) is not None


def users_table_exists():
    return sa.inspect(db.engine).has_table(USERS.name)


def add_user(user):
    """Add a new User to the session's transaction."""
    db.session.add(user)


def usernames_and_roles():
    """(username, role) of every user, by name."""
    return db.session.execute(sa.select(USERS.c.username, USERS.c.role).order_by(USERS.c.username)).all()


def set_password_hash(username, password_hash):
    """Store a user's new password hash in the session's transaction; False when there is no such user."""
    change = sa.update(USERS).where(USERS.c.username == username).values(password_hash=password_hash)
    return db.session.execute(change).rowcount == 1


def remove_user(username):
    """Delete a user (the database cascades to its tokens) in the session's transaction; False when there is none."""
    return db.session.execute(sa.delete(USERS).where(USERS.c.username == username)).rowcount == 1
