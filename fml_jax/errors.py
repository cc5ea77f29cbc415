"""Errors a user can fix: the command line prints them as one line, no traceback."""


class UserError(Exception):
  """A problem with the user's settings or environment, not a bug in fml_jax."""


class ConfigError(UserError):
  """A config field has a value that is not allowed.

  The message always starts with `config.<field>` so the user knows what to change.
  """

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"config.{field}: {message}")


class DataError(UserError):
  """A dataset could not be found, read or partitioned."""
