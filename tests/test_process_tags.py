"""tinymoe.process_tags: a process is found by the tag in its environment, also after it
left its parent's session, and killed; an untagged one is left alone."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinymoe.process_tags import kill_tagged, tagged_pids

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                reason="needs Linux /proc")
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_tagged_process_in_its_own_session_is_found_and_killed():
    tag = f"t{os.getpid()}-{time.time_ns()}"
    tagged = subprocess.Popen(SLEEP, env={**os.environ, "TINYMOE_TEST_TAG": tag},
                              start_new_session=True)
    other = subprocess.Popen(SLEEP, env={**os.environ, "TINYMOE_TEST_TAG": tag + "x"})
    try:
        assert tagged_pids("TINYMOE_TEST_TAG", tag) == [tagged.pid]
        assert kill_tagged("TINYMOE_TEST_TAG", tag) == [tagged.pid]
        assert tagged.wait(timeout=10) == -9
        assert other.poll() is None  # another value of the variable: untouched
        assert tagged_pids("TINYMOE_TEST_TAG", tag) == []
    finally:
        for p in (tagged, other):
            p.kill()
            p.wait()
