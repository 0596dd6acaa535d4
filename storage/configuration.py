"""The system configuration (one row), and the schema revision the database is at."""

import sqlalchemy as sa

from models import SystemConfiguration, db


def stored_configuration():
    """The SystemConfiguration row, in the session, or None before the first is stored."""
    return db.session.scalar(sa.select(SystemConfiguration).limit(1))


def store_configuration(configuration):
    """Add the configuration to the session's transaction and write it (a first one gets its id)."""
    db.session.add(configuration)
    db.session.flush()


def schema_revision():
    """The Alembic revision the database's schema is at; SQLAlchemyError when it cannot say."""
    return db.session.scalar(sa.text("SELECT version_num FROM alembic_version"))
