"""Can an agent run here? The engine, the image, each CLI in it, and credentials.

Every dispatch and resume asks :meth:`Preflight.check` before writing anything; `doctor`
reports the same checks for every agent.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ...errors import AgentNotReadyError, RuntimeUnavailableError
from ...models import AgentCheck, DoctorReport
from ...runtime.base import Runtime
from ...runtime.images import CLI_VERSIONS_LABEL, VERSIONS_SCRIPT, parse_versions
from ..catalog import AgentCatalog

__all__ = ["Preflight"]


class Preflight:
    """The checks before a run, and the doctor's report."""

    def __init__(self, runtime: Runtime, catalog: AgentCatalog, cache: Path) -> None:
        self.runtime = runtime
        self.catalog = catalog
        self._cache = cache  # the CLI versions of unlabelled images, by image id
        self._lock = threading.Lock()

    def check(self, base: str | None = None) -> None:
        """Check the engine is reachable and the agent image is present; with ``base``, also that
        the agent's CLI runs in the image and its credentials are found (what `doctor` checks).

        Raises:
            RuntimeUnavailableError: no engine or no image, with what to do about it.
            AgentNotReadyError: the agent cannot run; the doctor's reason.
        """
        self.runtime.check()
        image = self.catalog.image
        meta = self.runtime.image_meta(image)  # one look for its presence, its id and its labels
        if meta is None and not self.runtime.image_exists(image):  # a swarm's may be in its registry only
            raise RuntimeUnavailableError(
                f"the agent image {image!r} is not built. Run `agentic-dispatch image build` "
                "(or set `image` in the config file), then dispatch again."
            )
        if base is not None:
            # An image only in a swarm's registry has no labels to read here: its CLI is checked where it
            # is (by `doctor`, which pulls it, or by the run), not refused as if it did not run.
            versions = self.cli_versions(meta=meta) if meta is not None else None
            problems = self._agent_check(base, versions).problems
            if problems:
                raise AgentNotReadyError(" ".join(problems) + " (`agentic-dispatch doctor` checks every agent.)")

    def cli_versions(self, fresh: bool = False, meta: tuple[str, dict[str, str]] | None = None) -> dict[str, str]:
        """Each CLI's ``--version`` line in the agent image; a value starting with ``!`` is the error.

        From the label `image build` stamps on the image; for an image without it (one of yours),
        read once per image in a throw-away container and kept in ``state/cli-versions.json`` by
        image id. ``fresh`` (doctor) always runs the CLIs. ``meta``: the image's id and labels, when
        the caller has just looked them up.
        """
        image = self.catalog.image
        clis = sorted({a.cli for a in self.catalog.agents.values() if a.cli})
        image_id, labels = meta or self.runtime.image_meta(image) or (None, {})
        if not fresh and clis and (labelled := self._labelled(labels, clis)):
            return labelled
        if image_id is None or not clis:
            return {}
        with self._lock:
            try:
                known = json.loads(self._cache.read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                known = {}
            entry = known.get(image_id)
            if fresh or not isinstance(entry, dict) or not set(clis) <= set(entry):
                _, output = self.runtime.run_once(image, ["/bin/sh", "-c", VERSIONS_SCRIPT, "versions", *clis])
                entry = parse_versions(output, clis)
                tmp = self._cache.with_suffix(".tmp")
                tmp.write_text(json.dumps({image_id: entry}, indent=2), encoding="utf-8")  # only this image matters
                tmp.replace(self._cache)
            return {str(k): str(v) for k, v in entry.items()}

    @staticmethod
    def _labelled(labels: dict[str, str], clis: list[str]) -> dict[str, str] | None:
        """The versions the image's label records, when it names every CLI."""
        try:
            data = json.loads(labels.get(CLI_VERSIONS_LABEL, "{}"))
        except ValueError:
            return None
        if not isinstance(data, dict) or not set(clis) <= set(data):
            return None
        return {c: str(data[c]) for c in clis}

    def _agent_check(self, base: str, versions: dict[str, str] | None, blocker: str | None = None) -> AgentCheck:
        """``base``'s problems: ``blocker`` (no engine or no image: ``versions`` is then None and the
        CLI is not checked), its credentials, and its CLI's version in the image."""
        agent = self.catalog.agents[base]
        creds = self.catalog.credentials(base)
        problems = [p for p in (blocker, creds.problem) if p]
        version = versions.get(agent.cli) if agent.cli and versions is not None else None
        if agent.cli and versions is not None and (version is None or version.startswith("!")):
            why = version[1:] if version else "not checked"
            problems.append(
                f"{base}: the {agent.cli} CLI does not run in the image {self.catalog.image} ({why}). "
                "Rebuild it with `agentic-dispatch image build`."
            )
            version = None
        return AgentCheck(agent=base, ok=not problems, cli_version=version, credentials=creds.found, problems=problems)

    def doctor(self, agents: list[str] | None = None) -> DoctorReport:
        """Check, per agent: engine reachable, image present, CLI version in the image, credentials.

        Raises:
            InvalidInputError: an unknown agent name.
        """
        names = [self.catalog.parse(a).base for a in agents] if agents else sorted(self.catalog.agents)
        image = self.catalog.image
        where = self.runtime.describe()
        try:
            self.runtime.check()
        except RuntimeUnavailableError as e:
            checks = [self._agent_check(n, None, str(e)) for n in names]
            return DoctorReport(ok=False, engine=f"not reachable: {where}", image=image, agents=checks)
        if not self.runtime.image_exists(image):
            problem = f"the agent image {image} is not built on {where}; run `agentic-dispatch image build`."
            checks = [self._agent_check(n, None, problem) for n in names]
            return DoctorReport(ok=False, engine=f"reachable: {where}", image=f"{image} (missing)", agents=checks)
        if (unreachable := self.runtime.image_problem(image)) is not None:  # a swarm's nodes cannot all pull it
            checks = [self._agent_check(n, None, unreachable) for n in names]
            return DoctorReport(ok=False, engine=f"reachable: {where}", image=f"{image} ({unreachable})", agents=checks)
        versions = self.cli_versions(fresh=True)
        checks = [self._agent_check(n, versions) for n in names]
        return DoctorReport(ok=all(c.ok for c in checks), engine=f"reachable: {where}", image=image, agents=checks)
