"""A planted pickle for the tests that check untrusted files are read as data. Not a test module."""
import os


class RunsCode:
    """A pickle that runs a shell command when unpickled with weights_only=False."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)
