"""The service layer: one :class:`Dispatcher` facade, the only way in, over parts cut by job.

- ``facade``: :class:`Dispatcher`, the object both front ends call; wiring and the background threads.
- ``intake/``: a request becomes a validated, staged, queued workspace (``dispatch``), with the
  checks that the agent can run here (``preflight``).
- ``runs/``: the run's life. ``lifecycle`` is the state machine (a pure transition table);
  ``executor`` the one place its changes are written and its effects carried out; ``launch``
  starts queued runs' containers; ``qa_gate`` the QA gate's container; ``recovery`` the timer
  (missed exits, timeouts, the disk cap in ``disk_cap``, adoption, the engine sweep);
  ``control`` cancel, freeze and unfreeze.
- ``views/``: what is read, never calling the engine: ``status``, ``watching``, ``inspection``
  (logs and diffs), ``insights``.
- ``delivery``: the outbox that brings results home.
- ``catalog`` (the agents as configured), ``containers`` (how a run's container is built) and
  ``run_files`` (a run's prompt and files: a dispatch's, a resume's, a retry's) serve the parts above.
"""

from .facade import Dispatcher
from .views.insights import MAX_WINDOW_DAYS
from .views.inspection import MAX_TAIL_LINES
from .views.watching import MAX_LISTED, MAX_WATCH_SECONDS, describe

__all__ = ["MAX_LISTED", "MAX_TAIL_LINES", "MAX_WATCH_SECONDS", "MAX_WINDOW_DAYS", "Dispatcher", "describe"]
