"""job.status and job.cancel: any client may see and end the running job (docs/THREAT_MODEL.md, "Job control")."""

import errno
import threading

import pytest

from ansible_collections.confidential_ml.nitro.enclave_server.jobs import JobError
from ansible_collections.confidential_ml.nitro.tests.unit.test_jobs import APP, env, output_of, run  # noqa: F401


def start_spinning(runner):
    """Run spin.py in a thread; returns (thread, result list, events list) once the script prints."""
    events, result = [], []
    spinning = threading.Event()

    def emit(event):
        events.append(event)
        if event.get("type") == "stdout":
            spinning.set()

    def target():
        try:
            result.append(runner.run("/encrypted/app.pkg", "spin.py", [], unwrap_key=lambda h: bytes(range(32)),
                                     emit=emit, cancelled=threading.Event()))  # fmt: skip
        except BaseException as err:  # noqa: BLE001 - the test reports it
            result.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    assert spinning.wait(60), "spin.py never started"
    return thread, result, events


def test_status_names_the_running_job_and_cancel_ends_it(env):  # noqa: F811
    _share, runner, work = env
    assert runner.status() is None and runner.cancel() is None  # nothing runs: nothing to say or do
    thread, result, events = start_spinning(runner)
    status = runner.status()
    assert status["package"] == "/encrypted/app.pkg" and status["script"] == "spin.py"
    assert status["elapsed"] >= 0 and status["started"] > 0 and len(status["job"]) == 12
    assert "args" not in status  # what the job's arguments map to inside the enclave stays inside
    # A cancel aimed at another job leaves this one running.
    with pytest.raises(JobError) as caught:
        runner.cancel("000000000000")
    assert caught.value.errno == errno.ESRCH and status["job"] in caught.value.strerror
    assert runner.status()["job"] == status["job"]
    assert runner.cancel(status["job"])["job"] == status["job"]
    thread.join(60)
    assert not thread.is_alive()
    [summary] = result
    assert isinstance(summary, dict), summary
    assert summary["ended_by"] == "cancelled" and summary["rc"] != 0
    assert "spinning" in output_of(events, "stdout")
    assert runner.status() is None
    assert list(work.iterdir()) == []  # the plaintext is gone, as after the client's own cancel


def test_cancel_refuses_a_job_id_that_is_not_a_string(env):  # noqa: F811
    _share, runner, _work = env
    with pytest.raises(JobError) as caught:
        runner.cancel(["not", "an", "id"])
    assert caught.value.errno == errno.EINVAL


def test_a_cancel_while_inputs_are_hashed_says_it_came_from_elsewhere(env):  # noqa: F811
    share, runner, work = env
    share.create("/dataset/huge.bin")
    share.truncate("/dataset/huge.bin", 1 << 40)  # hashing takes minutes: the cancel lands in it
    caught = []

    def target():
        try:
            runner.run("/encrypted/app.pkg", "spin.py", [], unwrap_key=lambda h: caught.append("key") or bytes(32),
                       emit=lambda event: None, cancelled=threading.Event())  # fmt: skip
        except OSError as err:
            caught.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    while runner.status() is None:
        assert thread.is_alive(), caught
        threading.Event().wait(0.01)
    runner.cancel()
    thread.join(60)
    [err] = caught  # the key was never asked for
    assert err.errno == errno.ECANCELED and "cancelled from elsewhere" in err.strerror, err
    assert list(work.iterdir()) == []
    share.unlink("/dataset/huge.bin")
