"""How much vLLM, TRL and transformers print: quiet (the CLI's default) or verbose.

Importing ``trainserve`` never reconfigures logging on its own. The ``trainserve`` commands call
:func:`configure_logging` (quiet unless ``--verbose``); library users call it themselves or set
``TRAINSERVE_LOG_LEVEL`` (``debug``/``info``: verbose, ``warning``/``error``: quiet), which
``import trainserve`` applies. Call it before vLLM is imported: vLLM reads
``VLLM_LOGGING_LEVEL`` once, at import.

Quiet means: vLLM logs errors only (``VLLM_LOGGING_LEVEL=ERROR`` unless already exported) and
skips its checkpoint-loading bar; TRL's "supports vLLM versions from ..." warnings, transformers'
"torch.distributed process group is initialized, but parallel_mode != DISTRIBUTED" (the engine
starts a one-process group; training is not distributed) and a few other start-up notices are
dropped. Verbose keeps all of them.
"""

from __future__ import annotations

import logging
import os
import warnings

ENV_VAR = "TRAINSERVE_LOG_LEVEL"
_VERBOSE_LEVELS = ("DEBUG", "INFO")
# (logger, message start) pairs dropped in quiet mode.
_DROPPED_RECORDS = (
    ("transformers.training_args", "torch.distributed process group is initialized, but parallel_mode"),
    ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend"),
)
# (category, message regex) Python warnings ignored in quiet mode.
_IGNORED_WARNINGS = (
    (UserWarning, r"TRL currently supports vLLM versions"),
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated"),
)

_quiet: bool | None = None  # None: configure_logging was not called


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_vllm_level_set: str | None = None  # the VLLM_LOGGING_LEVEL this module set (a later call may change it)


def _set_vllm_level(level: str) -> None:
    global _vllm_level_set
    current = os.environ.get("VLLM_LOGGING_LEVEL")
    if current is None or current == _vllm_level_set:  # never override a value the user exported
        os.environ["VLLM_LOGGING_LEVEL"] = _vllm_level_set = level


def env_verbose() -> bool | None:
    """``TRAINSERVE_LOG_LEVEL`` as verbose (True), quiet (False) or unset (None)."""
    value = os.environ.get(ENV_VAR, "").strip().upper()
    if not value:
        return None
    return value in _VERBOSE_LEVELS


def configure_logging(verbose: bool | None = None) -> bool:
    """Make vLLM/TRL/transformers quiet (``verbose=False``) or leave them verbose; return ``verbose``.

    ``verbose=None`` takes ``TRAINSERVE_LOG_LEVEL`` (quiet when unset). Variables the user exported
    (``VLLM_LOGGING_LEVEL``) are kept.
    """
    global _quiet
    if verbose is None:
        verbose = bool(env_verbose())
    level = os.environ.get(ENV_VAR, "").strip().upper()
    if verbose:
        _set_vllm_level(level if level in _VERBOSE_LEVELS else "INFO")
        _quiet = False
        return True
    _set_vllm_level("ERROR")
    for category, pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, prefix in _DROPPED_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
    _quiet = True
    return False


def quiet() -> bool:
    """True after :func:`configure_logging` chose quiet (then vLLM's loading bar is skipped too)."""
    return bool(_quiet)


def apply_env_log_level() -> None:
    """``import trainserve``: apply ``TRAINSERVE_LOG_LEVEL`` when the user set it; otherwise do nothing."""
    if env_verbose() is not None and _quiet is None:
        configure_logging()
