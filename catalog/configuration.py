"""The system configuration: the default LLM and embedding models."""

import sqlalchemy as sa

from models import SystemConfiguration, db
from observability import audit
from storage.configuration import store_configuration, stored_configuration

# The id of the one row, so the defaults answered before the first PUT carry the id it creates.
SYSTEM_CONFIGURATION_ID = "00000000-0000-4000-8000-000000000000"


def system_configuration():
    """The stored configuration, or the defaults (not stored) before the first PUT."""
    configuration = stored_configuration()
    return configuration or SystemConfiguration(id=SYSTEM_CONFIGURATION_ID)


def replace_system_configuration(changes, username):
    configuration = system_configuration()
    values = {field: None if model_ref is None else str(model_ref) for field, model_ref in changes.items()}
    changed_fields = [field for field, value in values.items() if getattr(configuration, field) != value]
    for field, value in values.items():
        setattr(configuration, field, value)
    configuration.created_by = username
    try:
        store_configuration(configuration)  # gives a first configuration its id
        audit.record("configuration.update", configuration.id, changed_fields)
        db.session.commit()
    except sa.exc.IntegrityError:  # another PUT created the row first: change that one
        db.session.rollback()
        return replace_system_configuration(changes, username)
    return configuration
