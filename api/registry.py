"""The manifests' state and sync over HTTP: /api/v1/registry."""

from apifairy import authenticate, other_responses, response
from flask import Blueprint

from access.auth import auth
from catalog.manifests import registry_status, sync_manifests
from schemas import ManifestStatusSchema, ManifestSyncResultSchema, collection
from storage.paging import collection_of

registry_bp = Blueprint("registry", __name__)


@registry_bp.route("/registry", methods=["GET"])
@authenticate(auth, role="reader")
@response(collection(ManifestStatusSchema))
def status():
    """List the configured manifest locations and their last sync"""
    return collection_of(registry_status())


@registry_bp.route("/registry/sync", methods=["POST"])
@authenticate(auth, role="admin")
@response(collection(ManifestSyncResultSchema))
@other_responses({409: "Another manifest sync is still running"})
def sync():
    """Sync every configured manifest now"""
    return collection_of(sync_manifests())
