"""A gateway stream, whatever protocol it goes out in: the canonical events from the
upstream's adapter, relayed through the inbound protocol's encoder.

The canonical stream is the adapter's iterator of OpenAI chat chunks (upstreams/wire.py),
each a checked object with `choices` (deltas of text and tool calls, finish reasons) and,
in one chunk, the call's `usage`. `relay` owns what every protocol shares: the deadline,
the usage kept for the call, the time to the first event, the keep-alive while the upstream
is silent, the failure after the first event, the client that goes away, the worker that
stops under the stream, and `call_finished`. An encoder (an Encoder) turns the events into
its protocol's bytes:

- `events(chunk)`: the protocol's events (bytes) for one chunk (none is fine);
- `end(call)`: the events that close a stream that ended well (`call.usage` is known);
- `failure(status, message, error_type)`: the event that tells the client the stream
  failed after it began (status 502 or 504, and OpenAI's error type);
- `keepalive()`: what tells the client the stream is alive while the model says nothing.
"""

import json
import logging
from contextlib import closing
from itertools import chain, islice

from gateway.call import call_finished, sentence
from upstreams import UpstreamFailure, UpstreamRefusal, UpstreamTimeout
from upstreams.transport import SILENCE

log = logging.getLogger(__name__)

# An SSE comment, which SSE clients skip as the standard says (the openai packages do).
KEEPALIVE_COMMENT = b": keep-alive\n\n"


def sse(document, event=None):
    """One server-sent event of a JSON document, named when the protocol names its events."""
    data = b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"
    return data if event is None else b"event: " + event.encode() + b"\n" + data


class Encoder:
    """What every stream encoder shares: a keep-alive that is an SSE comment."""

    def keepalive(self):
        return KEEPALIVE_COMMENT


def canonical(chunk, call):
    """The chunk, `model` the registry's id; the usage, wherever the upstream put it, kept for
    the call and left out of the chunk (None for a chunk that held nothing else)."""
    usage = chunk.pop("usage", None)
    if usage:
        call.usage = usage
        if not chunk.get("choices"):
            return None
    chunk["model"] = call.model
    return chunk


def encoded(chunks, call, deadline, encoder, keepalive):
    """The encoder's events for each chunk within the call's deadline, and its keep-alive for
    each `keepalive` seconds the upstream keeps silent (0: none).

    The first chunk is in hand (the upstream's adapter read it to start the stream): it is
    taken here at once, not handed over by the reader beside, which cost the first event
    about a third of a millisecond."""
    with deadline.bounding():
        in_hand = list(islice(chunks, 1))
    with closing(deadline.each_within(chunks, silence=keepalive)) as arrivals:
        for chunk in chain(in_hand, arrivals):
            if chunk is SILENCE:
                yield encoder.keepalive()
                continue
            chunk = canonical(chunk, call)
            for event in encoder.events(chunk) if chunk is not None else ():
                call.first_chunk_sent()
                yield event
            if deadline.remaining() <= 0:
                raise UpstreamTimeout("the stream took longer than the gateway allows")


def relay(chunks, call, deadline, encoder, keepalive):
    """The encoder's events for each canonical chunk as soon as it arrives, then its end; its
    keep-alive for each `keepalive` seconds the upstream keeps silent (0: none).

    A failure after the first event is the encoder's failure event; a client that goes
    away closes this generator, which closes the upstream call.
    """
    try:
        try:
            yield from encoded(chunks, call, deadline, encoder, keepalive)
            yield from encoder.end(call)
        except UpstreamTimeout as timeout:
            call.outcome = "timeout"
            yield encoder.failure(504, sentence(f"The model did not answer in time: {timeout}"), "timeout")
        except (UpstreamFailure, UpstreamRefusal) as failure:
            call.outcome = "upstream_error"
            yield encoder.failure(502, sentence(f"The provider failed mid-stream: {failure}"), "api_error")
        except Exception:
            call.outcome = "upstream_error"
            log.exception("gateway stream of %s failed", call.model, extra=call.log_fields)
            yield encoder.failure(502, "The gateway met an unexpected error; it has been logged.", "api_error")
    except GeneratorExit:
        call.outcome = "cancelled"
        raise
    except BaseException:
        # The worker stopping under the stream: gevent's worker kills the greenlets still
        # serving past its graceful timeout (GreenletExit), a quit signal exits (SystemExit,
        # KeyboardInterrupt). Recorded as such, and let through.
        call.outcome = "interrupted"
        raise
    finally:
        call_finished(call)
