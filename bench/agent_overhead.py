"""Real-CLI dispatch overhead against a baseline measured in the same run.

Baseline: `git clone` of a repository plus `docker run` of the agent image running the CLI
by hand (headless, one scripted answer from tests/model_server.py).
Measured: an agentic-dispatch dispatch of the same agent on the same repository, from the
call to `completed` (workspace prep, prompt, credentials, container, summary, finalise).
Prints the ratio; never fails.

    .venv/bin/python bench/agent_overhead.py [--agent claude|codex|gemini] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dispatch_overhead import make_repo, report, time_dispatches
from tests.model_server import ModelServer, Say

from agentic_dispatch.runtime.images import default_image_tag


@dataclass(frozen=True)
class Cli:
    key: str  # API key variable
    model: str
    argv: list[str]  # the CLI run by hand, headless
    base_url_env: str


CLIS = {
    "claude": Cli(
        "ANTHROPIC_API_KEY",
        "claude-sonnet-4-5",
        ["claude", "-p", "hi", "--output-format", "stream-json", "--verbose", "--dangerously-skip-permissions"],
        "ANTHROPIC_BASE_URL",
    ),
    "gemini": Cli(
        "GEMINI_API_KEY",
        "gemini-2.5-pro",
        ["gemini", "-p", "hi", "--yolo", "--skip-trust", "-o", "stream-json"],
        "GOOGLE_GEMINI_BASE_URL",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent", choices=sorted(CLIS), default="claude")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cli = CLIS[args.agent]
    image = os.environ.get("AGENTIC_DISPATCH_IMAGE") or default_image_tag()
    client = docker.from_env()
    with tempfile.TemporaryDirectory() as tmp, ModelServer() as model:
        model.script([], then=Say("done"))
        root = Path(tmp)
        repo = root / "repo"
        make_repo(repo)
        home = root / "home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[agents.{args.agent}]\nbase_url = "{model.url}"\nmodel = "{cli.model}"\n',
            encoding="utf-8",
        )
        os.environ.update({"AGENTIC_DISPATCH_HOME": str(home), "AGENTIC_DISPATCH_IMAGE": image, cli.key: "bench-key"})

        baseline = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            dest = root / f"plain-{i}"
            agent_home = root / f"plain-home-{i}"
            agent_home.mkdir()
            subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True)
            if args.agent == "gemini":  # the API key needs its auth type in the settings
                (agent_home / ".gemini").mkdir()
                (agent_home / ".gemini" / "settings.json").write_text(
                    '{"security":{"auth":{"selectedType":"gemini-api-key"}}}', encoding="utf-8"
                )
            client.containers.run(
                image,
                [*cli.argv, "--model", cli.model],
                remove=True,
                working_dir="/workspace",
                environment={
                    "HOME": "/agentic/home",
                    "IS_SANDBOX": "1",
                    cli.key: "bench-key",
                    cli.base_url_env: model.docker_url,
                },
                volumes={
                    str(dest): {"bind": "/workspace", "mode": "rw"},
                    str(agent_home): {"bind": "/agentic/home", "mode": "rw"},
                },
                extra_hosts={"host.docker.internal": "host-gateway"},
                init=True,
                user=f"{os.getuid()}:{os.getgid()}",  # as agentic-dispatch runs it: the host user owns the files
            )
            baseline.append(time.perf_counter() - t0)

        measured = time_dispatches(client, repo, "say done", args.agent, args.runs)
    report(
        f"baseline (git clone + docker run {args.agent})", f"agentic-dispatch {args.agent} dispatch", baseline, measured
    )


if __name__ == "__main__":
    main()
