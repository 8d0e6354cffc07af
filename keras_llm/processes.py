"""Process lifetimes: a child process that must not outlive the process that started it.

Plain standard library, so a child imports it in milliseconds (no TensorFlow)."""
import os
import signal
import sys
import threading
import time


def exit_with_parent(parent_pid):
    """Ends this process as soon as its parent `parent_pid` dies (killed, say).

    A child that outlived its parent would go on writing where the parent's rerun starts a
    new child (a tuning trial, in the trial directory the resumed search hands out again),
    and the two would clash there. Call it first thing in the child. Linux
    delivers SIGKILL on the parent's death (`PR_SET_PDEATHSIG`); elsewhere a daemon thread
    watches the parent id."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(0.2)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # it died before the lines above
        os._exit(1)
