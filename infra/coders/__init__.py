"""Coder backends: one interface (:class:`Coder`), several implementations."""

from .base import Budget, CodeOutcome, CodeRequest, Coder, CodeStatus, mask_secrets
from .scripted import ScriptedCoder

__all__ = ["Budget", "CodeOutcome", "CodeRequest", "CodeStatus", "Coder", "ScriptedCoder", "mask_secrets"]
