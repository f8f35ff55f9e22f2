"""The one error type of the converter: a message meant for the person running it."""


class ConversionError(Exception):
    """The input cannot be converted as asked; the message says which keys or files and what to do."""


__all__ = ["ConversionError"]
