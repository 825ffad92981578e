"""Services: the long-lived duties of a worker, and the runs a script starts.

``genx worker`` (take runs from the queue, place them on run hosts, drain on SIGTERM), the
supervisor (restart runs whose host died), the timer service (due sleeps, input deadlines,
scheduled runs, cron schedules), webhook delivery, and :func:`run` / :func:`start` for a script
or notebook.
"""

from genx_ray.service._script import RunHandle, close_runners, run, start
from genx_ray.service._supervisor import Supervisor
from genx_ray.service._timers import Timers
from genx_ray.service._webhooks import WebhookSender, sign
from genx_ray.service._worker import Worker, serve_worker

__all__ = [
    "RunHandle",
    "Supervisor",
    "Timers",
    "WebhookSender",
    "Worker",
    "close_runners",
    "run",
    "serve_worker",
    "sign",
    "start",
]
