"""Routing a gateway call: the model's providers from the model index, each tried in turn
until one accepts the call (failover on a connection failure, 429 or 5xx, or an answer not
started within the attempt timeout), those in their cooldown after the others.

A call is routed while the request holds the database; then the database is let go
(storage.connections.no_connection) and only then is an upstream called, so no connection or
transaction waits on a model. Each provider's key is opened when its attempt starts.
"""

import logging
import re
import time
from contextlib import contextmanager

from werkzeug.exceptions import NotFound, ServiceUnavailable

from access.crypto import UnopenableApiKey
from access.limits import admit
from api.errors import GatewayError, LimitExceeded
from catalog.index import provider_target, providers_serving
from gateway.call import call_finished, call_started, sentence
from models import CAPABILITIES_BY_TYPE, ModelRef
from storage.connections import no_connection
from upstreams import UpstreamFailure, UpstreamRefusal, UpstreamTimeout, adapter_of

log = logging.getLogger(__name__)


def model_not_found(model_ref, why):
    return GatewayError(
        404, sentence(f"The model {model_ref!r} does not exist: {why}"), code="model_not_found", param="model"
    )


def parse_model_ref(model_ref, capability):
    """The ModelRef of a registry model id that names a model of the capability."""
    if not model_ref:
        raise GatewayError(400, "`model` must name a model: its registry id, as type:upstream id.", param="model")
    try:
        parsed = ModelRef.parse(model_ref)
    except ValueError as error:
        raise model_not_found(model_ref, str(error)) from None
    if capability not in CAPABILITIES_BY_TYPE[parsed.type]:
        kind = "chat" if capability == "llm" else "embeddings"
        raise GatewayError(400, f"{parsed.type} models do not serve {kind}.", param="model")
    return parsed


def target_of(provider):
    """The provider as a call's target, its key opened when its attempt starts: a key the
    configured encryption keys cannot open fails this provider only."""
    try:
        return provider_target(provider)
    except UnopenableApiKey:
        raise UpstreamFailure(f"the registry cannot open the API key of provider {provider.id}") from None


def serving_providers(parsed):
    """The online providers of the model, oldest first, from the model index."""
    try:
        return providers_serving(parsed)
    except NotFound:
        raise model_not_found(str(parsed), f"no {parsed.type} provider serves {parsed.upstream_id!r}") from None
    except ServiceUnavailable:
        raise GatewayError(503, f"Every provider of {parsed} is offline; try again when one answers.") from None


class Cooldowns:
    """The providers that failed a call, each until its cooldown ends, in this worker
    process's memory: each worker (and each instance) learns of a failure by meeting it."""

    def __init__(self):
        self._ends = {}  # provider id -> time.monotonic() at which its cooldown ends

    def start(self, provider_id, seconds):
        now = time.monotonic()
        ends = {cooling: end for cooling, end in list(self._ends.items()) if end > now}
        if seconds > 0:
            ends[provider_id] = now + seconds
        self._ends = ends

    def end(self, provider_id):
        self._ends.pop(provider_id, None)

    def in_turn(self, providers):
        """The providers in the order they are tried: those in their cooldown after the
        others, each group in the order given (oldest first)."""
        now = time.monotonic()
        return sorted(providers, key=lambda provider: self._ends.get(provider.id, 0) > now)


COOLDOWNS = Cooldowns()


def route(call, capability):
    """(the upstream's model id, its providers in the order they are tried): oldest first,
    those in their cooldown last."""
    parsed = parse_model_ref(call.model, capability)
    call.provider_type = parsed.type
    admit(call)
    try:
        providers = serving_providers(parsed)
    except GatewayError as error:
        call.indexed = error.status == 503  # indexed, its providers offline
        raise
    call.indexed = True
    return parsed.upstream_id, COOLDOWNS.in_turn(providers)


def refused(refusal, target):
    error = refusal.error
    return GatewayError(
        refusal.status,
        error["message"],
        code=error.get("code"),
        param=error.get("param"),
        error_type=error.get("type"),
        headers={"X-Registry-Provider-Id": target.provider_id},
    )


def is_delay_in_seconds(retry_after):
    """A Retry-After in seconds the registry can pass on (its HTTP-date form is not)."""
    return re.fullmatch(r"\d{1,9}", retry_after or "") is not None


def delay_in_seconds(retry_after):
    return int(retry_after) if is_delay_in_seconds(retry_after) else 0


class AnswerNotStarted(UpstreamFailure):
    """A provider that did not start its answer within the attempt timeout."""

    status = 504

    def __init__(self, provider, deadline):
        super().__init__(f"provider {provider.id} did not start its answer within {deadline.answer_seconds:g} s")


def every_provider_failed(failures):
    """429 when every provider said so (with the soonest Retry-After), 504 when none started
    its answer in time, else 502."""
    reasons = "; ".join(str(failure) for failure in failures)
    if all(failure.status == 429 for failure in failures):
        waits = sorted(int(failure.retry_after) for failure in failures if is_delay_in_seconds(failure.retry_after))
        headers = {"Retry-After": str(waits[0])} if waits else {}
        return GatewayError(429, "Every provider of the model is rate-limiting; retry later.", headers=headers)
    if all(isinstance(failure, AnswerNotStarted) for failure in failures):
        return GatewayError(504, sentence(f"No provider of the model started its answer in time: {reasons}"))
    return GatewayError(502, sentence(f"Every provider of the model failed: {reasons}"))


def first_answer(providers, attempt, call, deadline, cooldown):
    """(target, answer) from the first provider that accepts the call, trying them in turn
    on a connection failure, 429 or 5xx, or an answer not started within the deadline's
    answer_seconds; every attempt's socket work within the deadline. A provider that fails
    goes after the others for `cooldown` seconds (or its longer Retry-After)."""
    failures = []
    for provider in providers:
        try:
            target = target_of(provider)
            with no_connection(), deadline.attempt():
                answer = attempt(target)
        except UpstreamFailure as failure:
            failures.append(failure)
        except UpstreamTimeout as timeout:
            if deadline.answer_seconds and deadline.remaining() > 0:  # the attempt's own limit passed, not the call's
                failures.append(AnswerNotStarted(provider, deadline))
            else:
                COOLDOWNS.start(provider.id, cooldown)
                call.served_by(target)
                raise GatewayError(504, f"The model did not answer in time: {timeout}.") from None
        except UpstreamRefusal as refusal:
            call.served_by(target)
            raise refused(refusal, target) from None
        else:
            COOLDOWNS.end(provider.id)
            call.served_by(target)
            return target, answer
        log.warning("gateway: %s; trying the next provider", failures[-1])
        COOLDOWNS.start(provider.id, max(cooldown, delay_in_seconds(failures[-1].retry_after)))
    raise every_provider_failed(failures)


def outcome_of_refusal(error):
    """How the metrics name a call answered with this error."""
    if isinstance(error, LimitExceeded):
        return "limited"
    status = error.status
    named = {404: "not_found", 503: "unavailable", 504: "timeout", 502: "upstream_error", 429: "upstream_error"}
    return named.get(status, "client_error" if status < 500 else "upstream_error")


@contextmanager
def counted_if_refused(call):
    """A call refused before any answer is counted here; one answered, when its answer is done."""
    try:
        yield
    except GatewayError as error:
        call.outcome = outcome_of_refusal(error)
        call.status = error.status
        call_finished(call)
        raise


def served_answer(call, capability, operation, settings):
    """(target, answer, the call's deadline) of the first provider of the call's model that
    accepts it, asked as `operation(adapter, target, upstream model id, deadline)` through the
    wire format adapter of each provider's type."""
    deadline = settings.deadline()
    with counted_if_refused(call):
        try:
            model, providers = route(call, capability)
        finally:
            call_started(call)

        def ask(target):
            return operation(adapter_of(target.type), target, model, deadline)

        target, answer = first_answer(providers, ask, call, deadline, settings.cooldown)
    return target, answer, deadline
