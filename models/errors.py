"""Typed errors of models/: the serving layer maps them to HTTP statuses (docs/API.md, Errors)."""
from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model could not be downloaded, detected or loaded. The message names the model, the file and the cause."""

    def __init__(self, model_id: str, cause: str, file: str | None = None):
        self.model_id, self.cause, self.file = model_id, cause, file
        where = f" (file {file})" if file else ""
        super().__init__(f"cannot load model {model_id!r}{where}: {cause}")


class InputError(ValueError):
    """Bad user input found while encoding; becomes a 422 `Validation` error. `index` is the offending item;
    `field` says which part of it when that is not the item itself: "query" (the item's query) or "instruction"
    (the request's instruction, which belongs to no item)."""

    def __init__(self, message: str, index: int | None = None, field: str | None = None):
        self.index, self.field = index, field
        super().__init__(message)


class InputTooLongError(InputError):
    """An input longer than the model's limit with truncation off, or a Qwen3 prefix+suffix that alone do not fit."""


class PairRequiredError(InputError):
    """A single text sent to a model that only scores (query, document) pairs."""


class InstructionNotSupportedError(InputError):
    """An `instruction` sent to a model that takes none."""


class DeviceMemoryError(RuntimeError):
    """The device had no memory for one sequence of a request even scored alone (after smaller retries): a property
    of that request on this deployment, not of the replica, which stays healthy."""
