"""How work shares a gevent worker (docs/production.md)."""

import threading

from gevent import get_hub, monkey, spawn


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


def beside(function, *args):
    """Start `function(*args)` beside the caller, which goes on, and return what interrupts it.

    When gevent drives this process it is a greenlet (a little memory), which the interrupt
    kills where it waits (GreenletExit raised there). Otherwise it is a daemon thread, which
    nothing can interrupt: `function` must end on its own.
    """
    if monkey.is_module_patched("threading"):
        greenlet = spawn(function, *args)
        return lambda: greenlet.kill(block=False)
    threading.Thread(target=function, args=args, daemon=True).start()
    return lambda: None
