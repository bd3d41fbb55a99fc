"""User-facing errors: raised for problems a user can fix; CLIs print them as one line and exit non-zero."""


class UserError(Exception):
    """A problem caused by the user's input (file, checkpoint, config); the message names it and the fix."""


class CheckpointError(UserError):
    """A model directory, hub id or LoRA that cannot be loaded or does not match the model."""


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it: ``poll`` reports POLLERR for its write end."""
    import select
    import sys

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no real file descriptor
        return False


def exit_with(main, *args):
    """A command's ``__main__``: run ``main(*args)`` and exit with the code it returns.

    When the reader of standard output goes away early (``python -m editgrpo.recipes | head``, quitting ``less``), the
    command ends quietly with exit code 141 (128 + SIGPIPE, what a Unix tool the signal stops returns), not a
    ``BrokenPipeError`` traceback: the remedy of Python's ``signal`` documentation ("Note on SIGPIPE"), standard output
    pointed at ``/dev/null`` so that the interpreter's final flush is quiet too. A ``BrokenPipeError`` from anything
    else (a reward server's socket) is raised as before."""
    import os
    import sys

    try:
        code = main(*args)
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    raise SystemExit(code)
