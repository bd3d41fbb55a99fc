"""User-facing errors: raised for problems a user can fix; CLIs print them as one line and exit non-zero."""


class UserError(Exception):
    """A problem caused by the user's input (file, checkpoint, config); the message names it and the fix."""


class CheckpointError(UserError):
    """A model directory, hub id or LoRA that cannot be loaded or does not match the model."""
