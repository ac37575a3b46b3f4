"""The parent that watches one process of a multi-process run (jdmt/train/supervisor.py)."""

import signal
import subprocess
import sys
import textwrap
import time

from jdmt.train.supervisor import WORKER_ENV, supervise


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_exit_status_passes_through(tmp_path):
    worker = _script(tmp_path, """
        import os, sys
        assert os.environ["%s"] == str(os.getppid())
        sys.exit(3)
    """ % WORKER_ENV)
    assert supervise([worker], 0) == 3


def test_death_by_abort_is_one_clear_line(tmp_path, capfd):
    worker = _script(tmp_path, "import os; os.abort()\n")
    assert supervise([worker], 1) == 1
    err = capfd.readouterr().err
    assert "train.py: error: process 1: the training process died of SIGABRT: a collective failed" in err


def test_the_worker_dies_with_its_parent(tmp_path):
    """SIGKILL the supervising parent: its worker does not outlive it."""
    pid_file = tmp_path / "worker.pid"
    worker = _script(tmp_path, f"""
        import os, time
        from jdmt.train.supervisor import become_worker
        become_worker()
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c",
                               f"from jdmt.train.supervisor import supervise; supervise([{worker!r}], 0)"])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the worker outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
