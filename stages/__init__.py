"""The pipeline's stages, one script each (``python -m stages.<name> <experiment>``), run by dvc.yaml.

Importing the stages' modules (torch above all) takes seconds, often most of a short stage's time;
a Ctrl-C then would print a traceback through torch's import. Until ``space.cli.stage_main`` takes
over, an interrupt ends the process with one line and the shell's code for SIGINT.
"""
import signal
import sys


def _interrupted_while_importing(signum, frame):
    print("error: interrupted", file=sys.stderr)
    raise SystemExit(130)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, a shell's &)
    signal.signal(signal.SIGINT, _interrupted_while_importing)
