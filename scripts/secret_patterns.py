"""detect-secrets plugin: the API keys agentic-dispatch hands to agents (scripts/test scans the
repository with it and the built-in detectors; see .secrets.baseline)."""

import re

from detect_secrets.plugins.base import RegexBasedDetector


class AgentApiKeyDetector(RegexBasedDetector):
    """Anthropic (sk-ant-api03-...), OpenAI project/service/admin (sk-proj-...) and Google/Gemini (AIza...) keys."""

    secret_type = "Agent API Key"  # pragma: allowlist secret
    denylist = (
        re.compile(r"sk-ant-[a-z]{2,8}\d{2}-[A-Za-z0-9_-]{20,}"),
        re.compile(r"sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}"),
        re.compile(r"AIza[0-9A-Za-z_-]{35}"),
    )
