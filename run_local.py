"""`make run`: honcho over the Procfile, giving every process the time of a warm shutdown.

One Ctrl-C reaches make and honcho (honcho runs each process in a session of its own);
honcho sends SIGTERM to every process and, by default, SIGKILL to whatever still runs 5 s
after the first one stopped. An idle Celery worker's warm shutdown takes 3-8 s on the
embedded broker (its broker polling, timer and pool threads each sleep up to a second, and
more on a busy machine), so the workers were killed. KILL_WAIT is a module constant of
honcho 2.0.0 (pinned in requirements.txt; tests/test_make_run.py checks the whole stop).
"""
import sys

from honcho import manager
from honcho.command import main

# Past the 10 s every process is given to stop (README "Two commands"): only a process that
# hangs is killed.
manager.KILL_WAIT = 15

if __name__ == "__main__":
    sys.exit(main())
