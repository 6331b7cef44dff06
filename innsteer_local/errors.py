"""The project's exception types: every failure a user can cause maps to one of these."""


class InnsteerError(Exception):
    """Base class of all innsteer-local errors."""


class FlowFormatError(InnsteerError, ValueError):
    """A flow file is missing, truncated, corrupted, not a flow, or fails validation."""


class FlowMismatchError(InnsteerError, ValueError):
    """A flow does not fit the model it is attached to (width or layer)."""


class ModelError(InnsteerError):
    """A model cannot be found, fetched or verified."""


class SteeringError(InnsteerError, RuntimeError):
    """Steering could not be applied (e.g. the model never computes the steered tensor)."""


class InvalidArgument(InnsteerError, ValueError):
    """A value passed to the library is out of range, of the wrong kind, or names nothing known."""


class ContextLengthError(InvalidArgument):
    """A prompt (with the reply it asks for) does not fit a sequence's context window."""


class UnknownFlow(InnsteerError, KeyError):
    """A flow (an attached flow, or a flow's site at a layer) that is not there."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
