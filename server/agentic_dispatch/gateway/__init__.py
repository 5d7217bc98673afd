"""The run gateway: how runs with network transfer get their workspace and send their results back."""

from .server import RunGateway
from .tokens import issue_token, token_run
from .transfer import Received, begin_job, received

__all__ = ["Received", "RunGateway", "begin_job", "issue_token", "received", "token_run"]
