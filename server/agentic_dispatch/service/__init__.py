"""The service layer: one :class:`Dispatcher` facade over one-job parts.

Where things happen (each module's docstring says more):

- ``facade``: :class:`Dispatcher`, the object both front ends call; wiring and background threads.
- ``dispatching``: a request → validated spec → staged workspace → queued record; dry run; resume.
- ``drain``: the queue is drained here; the only place a run's container is started.
- ``finalise``: a run is finalised here (the final-status rule); stopping a run.
- ``recovery``: reconcile at start and on the timer, timeouts, adoption, orphans, cleanup.
- ``reports``: status rows and wait.  ``preflight``: engine, image, CLIs, credentials; doctor.
- ``control``: cancel, freeze, unfreeze.  ``delivery``: sync.
- ``run_files``: a run's prompt and files.  ``catalog``: agents, credentials, image.  ``common``: helpers.
"""

from .facade import Dispatcher

__all__ = ["Dispatcher"]
