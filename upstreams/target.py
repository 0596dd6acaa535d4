"""What an upstream call needs of a provider: no database or app context needed."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One provider as the upstream calls see it, its key opened.

    `timeout` bounds a listing in all and a gateway call's connect; `provider_id` is None
    while a provider not yet stored is verified.
    """

    type: str
    base_url: str
    api_key: str
    timeout: float
    provider_id: str | None = None
    watsonx_project_id: str | None = None
    watsonx_space_id: str | None = None
    watsonx_iam_url: str | None = None  # where a watsonx key is exchanged for tokens
