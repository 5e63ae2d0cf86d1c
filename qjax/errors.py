"""The one exception family of qjax.

Every error a user can trigger with bad input (a malformed file, a shape a group size does not
divide, NaN weights, an unknown format, a rule that matches nothing) is a
:class:`QjaxError`, and its
message names the file, tensor or parameter path it is about.
"""

from __future__ import annotations


class QjaxError(Exception):
    """Base class of every error qjax raises on bad input."""


class FormatError(QjaxError):
    """A file or tensor is malformed, truncated, or of an unsupported type."""


class ShapeError(QjaxError):
    """A shape does not fit a layout (e.g. a group size that does not divide an axis)."""


class RuleError(QjaxError):
    """A quantization rule is wrong: it matches nothing, or a param is matched by no rule."""


class SpecError(QjaxError):
    """A quantization spec is invalid or unknown (bad bit width, unknown format name, ...)."""


class NonFiniteError(QjaxError):
    """A tensor to quantize holds NaN or Inf."""


class AssetError(QjaxError):
    """A real model or corpus is missing from the cache and cannot be fetched."""
