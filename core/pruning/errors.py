"""Typed failures of a pruning run; `code` is what a failed job reports."""


class PruningError(Exception):
    code = "internal_error"


class ModelNotFoundError(PruningError):
    code = "model_not_found"


class InvalidModelError(PruningError):
    code = "invalid_model"


class CalibrationError(PruningError):
    code = "calibration_error"


class EvaluationError(PruningError):
    code = "evaluation_error"


class NumericalError(PruningError):
    code = "numerical_error"


class Cancelled(PruningError):
    """Raised between blocks when the caller's `should_stop()` returns True."""

    code = "cancelled"


class RecoveryDataError(PruningError):
    """The recovery text cannot give one batch (or cannot be read)."""

    code = "recovery_data_error"


class RecoveryError(PruningError):
    """Recovery cannot run as configured (e.g. the distillation teacher will not fit)."""

    code = "recovery_error"
