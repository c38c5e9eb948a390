"""Coder backends: one interface (:class:`Coder`), several implementations."""

from infra.adapters.coders.base import Budget, CodeOutcome, CodeRequest, Coder, CodeStatus, mask_secrets
from infra.adapters.coders.scripted import ScriptedCoder

__all__ = ["Budget", "CodeOutcome", "CodeRequest", "CodeStatus", "Coder", "ScriptedCoder", "mask_secrets"]
