"""The one exception type that means "the user asked for something that cannot work".

Scripts catch it and print its message as a single line; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (path, config, checkpoint, flag), stated so they can fix it."""
