"""The OpenAI-style model list across every online provider."""

from apifairy import authenticate, response
from flask import Blueprint

from auth import auth
from catalog import available_models
from schemas import OpenAIModelListSchema

openai_bp = Blueprint("openai", __name__)


@openai_bp.route("/openai/models", methods=["GET"])
@authenticate(auth, role="reader")
@response(OpenAIModelListSchema)
def list_models():
    """List the models of every online provider, OpenAI style

    Answered from the model index (no upstream is asked): each model id once, shown with
    the oldest online provider that lists it.
    """
    return {"object": "list", "data": available_models()}
