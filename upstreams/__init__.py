"""The upstream providers, one adapter per wire format, chosen once by provider type.

Every adapter answers the same calls (upstreams/wire.py); every failure is of one family
(upstreams/errors.py), whose message never carries the key or the upstream's body. A call
needs a Target (upstreams/target.py) and no database or app context. Nothing here counts
metrics: the caller passes `observe(provider_type, seconds)` to hear of each listing call.
"""

from upstreams.anthropic import Anthropic
from upstreams.errors import UpstreamError, UpstreamFailure, UpstreamRefusal, UpstreamTimeout
from upstreams.github import GitHub
from upstreams.openai import OpenAICompatible, Rits
from upstreams.target import Target
from upstreams.transport import deadline
from upstreams.voyage import Voyage
from upstreams.watsonx import Watsonx

__all__ = [
    "Target",
    "UpstreamError",
    "UpstreamFailure",
    "UpstreamRefusal",
    "UpstreamTimeout",
    "adapter_of",
    "list_models",
]

OPENAI_COMPATIBLE = OpenAICompatible()
ADAPTERS_BY_TYPE = {
    "anthropic": Anthropic(),
    "github": GitHub(),
    "rits": Rits(),
    "voyage": Voyage(),
    "watsonx": Watsonx(),
}


def adapter_of(provider_type):
    """The wire format of a provider type: its own, else OpenAI-compatible (most types are)."""
    return ADAPTERS_BY_TYPE.get(provider_type, OPENAI_COMPATIBLE)


def ignore(provider_type, seconds):
    """An observer that counts nothing."""


def list_models(target, observe=ignore):
    """The upstream's models, or an UpstreamError saying why they could not be listed;
    all of its socket work within the target's timeout."""
    with deadline(target.timeout):
        return adapter_of(target.type).list_models(target, observe)
