"""How work shares a gevent worker (docs/production.md)."""

from gevent import get_hub, monkey


def off_the_hub(function, *args):
    """`function(*args)`, run in a real thread when gevent drives this process.

    Under gunicorn's gevent worker every connection of a worker is a greenlet on one hub:
    CPU-heavy work (a slow password hash, scoring a match, parsing a large listing) run
    there stalls all of them until it ends. In a thread it shares the CPU with them
    instead (hashlib releases the interpreter; pure Python code yields it every few ms).
    Without gevent (tests, the CLI, an embedding server) it simply runs here.
    """
    if not monkey.is_module_patched("threading"):
        return function(*args)
    return get_hub().threadpool.apply(function, args)
