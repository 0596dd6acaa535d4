"""Encryption of stored API keys with Fernet, keys from the configuration or a key file."""

import os
import tempfile
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from flask import current_app

KEY_FILE_NAME = "encryption.key"


class UnopenableApiKey(RuntimeError):
    """A stored API key that none of the configured encryption keys opens."""


def read_or_create_key_file(instance_path):
    """The instance's own key, generated once with mode 0600.

    Several workers may start at once: the key is written whole to a private temporary
    file, then linked into place, so no worker ever reads a half-written key file.
    """
    path = os.path.join(instance_path, KEY_FILE_NAME)
    if not os.path.exists(path):
        fd, draft_path = tempfile.mkstemp(dir=instance_path, prefix=".key-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as draft:
                draft.write(Fernet.generate_key())
            os.link(draft_path, path)
        except FileExistsError:  # another worker linked its key first: use that one
            pass
        finally:
            os.unlink(draft_path)
    with open(path, "rb") as key_file:
        key = key_file.read().strip()
    if not key:
        raise RuntimeError(f"Encryption key file {path} is empty.")
    return key


class ApiKeyCipher:
    """Seals with the first configured key, opens with any of them (per application)."""

    def init_app(self, app):
        keys = app.config["ENCRYPTION_KEYS"] or [read_or_create_key_file(app.instance_path)]
        try:
            app.extensions["api_key_cipher"] = MultiFernet([Fernet(key) for key in keys])
        except ValueError:
            raise RuntimeError("REGISTRY_ENCRYPTION_KEYS holds a key that is not a Fernet key.") from None

    @property
    def _fernet(self):
        return current_app.extensions["api_key_cipher"]

    def seal(self, api_key):
        return self._fernet.encrypt(api_key.encode()).decode()

    def open(self, sealed_api_key):
        return opened_api_key(self._fernet, sealed_api_key)

    def reseal(self, sealed_api_key):
        """The same key sealed under the first configured key."""
        try:
            return self._fernet.rotate(sealed_api_key.encode()).decode()
        except InvalidToken:
            raise UnopenableApiKey("A stored API key cannot be decrypted with the configured keys.") from None


@lru_cache(maxsize=1024)
def opened_api_key(fernet, sealed_api_key):
    """A sealed key opened once per process (and set of encryption keys): every gateway call
    opens its provider's key, and Fernet's check and decryption cost more than its routing.
    The opened keys stay in this process's memory, which holds the keys that open them
    anyway; a key that cannot be opened is tried again each time."""
    try:
        return fernet.decrypt(sealed_api_key.encode()).decode()
    except InvalidToken:
        raise UnopenableApiKey("A stored API key cannot be decrypted with the configured keys.") from None


cipher = ApiKeyCipher()
