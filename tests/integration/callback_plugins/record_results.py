"""Test callback: ansible-core has no JSON stdout callback (that one is ansible.posix's), so this
notification callback writes every task result and the recap to the file named by TEST_RESULTS_FILE."""

import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "record_results"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tasks = {}

    def _record(self, result, *args, **kwargs):
        self.tasks[result.task_name] = dict(result._result)

    v2_runner_on_ok = v2_runner_on_failed = v2_runner_on_skipped = _record

    def v2_playbook_on_stats(self, stats):
        recap = {host: stats.summarize(host) for host in stats.processed}
        with open(os.environ["TEST_RESULTS_FILE"], "w") as out:
            json.dump({"tasks": self.tasks, "stats": recap}, out, default=str)
