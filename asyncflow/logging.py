"""Logging set up in one call, under radical.asyncflow's names.

asyncflow itself only logs to the ``asyncflow`` logger and configures nothing
(a library must not), so a script that wants to see what happens calls
:func:`init_default_logger` once, as radical.asyncflow scripts already do.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

__all__ = ["get_logger", "init_default_logger"]

_FORMATS = {
    "modern": "%(asctime)s %(levelname)-8s %(name)s: %(message)s",
    "core": "%(asctime)s %(levelname)s [%(name)s] %(message)s",
    "execution_backend": "%(asctime)s %(levelname)s [%(name)s] %(message)s",
    "minimal": "%(levelname)s: %(message)s",
}
_DETAILS = " (%(processName)s/%(threadName)s)"
_COLORS = {"WARNING": "33", "ERROR": "31", "CRITICAL": "1;31", "DEBUG": "2"}


class _Colored(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        code = _COLORS.get(record.levelname)
        return f"\x1b[{code}m{text}\x1b[0m" if code else text


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": time.strftime(
                    "%Y-%m-%dT%H:%M:%S", time.localtime(record.created)
                ),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                "thread": record.threadName,
            }
        )


def init_default_logger(
    log_level: int | str = logging.INFO,
    *,
    output_file: str | pathlib.Path | None = None,
    file_log_level: int | str | None = None,
    use_colors: bool = True,
    show_details: bool = False,
    style: str = "modern",
    clear_handlers: bool = False,
    logger_name: str | None = None,
    structured_logging: bool = False,
    structured_file: str | pathlib.Path | None = None,
) -> logging.Logger:
    """Send ``logger_name``'s records (the root logger's by default) to stderr,
    and to ``output_file`` and, as JSON lines, ``structured_file`` if given.
    Colours only reach a terminal."""
    if style not in _FORMATS:
        raise ValueError(f"style must be one of {sorted(_FORMATS)}, got {style!r}")
    logger = logging.getLogger(logger_name)
    if clear_handlers:
        _clear(logger)
    fmt = _FORMATS[style] + (_DETAILS if show_details else "")
    file_level = file_log_level if file_log_level is not None else log_level
    handlers = [
        _console(fmt, log_level, use_colors),
        *_files(fmt, file_level, output_file, structured_logging, structured_file),
    ]
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(min(h.level for h in handlers))  # setLevel made them ints
    return logger


def _clear(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _console(fmt: str, level: int | str, use_colors: bool) -> logging.Handler:
    """stderr, coloured only when it is a terminal: escapes would litter a
    redirected log."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    colored = use_colors and sys.stderr.isatty()
    console.setFormatter((_Colored if colored else logging.Formatter)(fmt))
    return console


def _files(
    fmt: str,
    level: int | str,
    output_file: str | pathlib.Path | None,
    structured_logging: bool,
    structured_file: str | pathlib.Path | None,
) -> list[logging.Handler]:
    """The file handlers asked for: plain text to ``output_file``, JSON lines
    to ``structured_file`` (by default beside ``output_file``)."""
    handlers = []
    if output_file is not None:
        handlers.append(_to_file(output_file, level, logging.Formatter(fmt)))
    if structured_logging or structured_file is not None:
        path = structured_file or pathlib.Path(output_file or "asyncflow").with_suffix(
            ".jsonl"
        )
        handlers.append(_to_file(path, level, _JsonLines()))
    return handlers


def _to_file(
    path: str | pathlib.Path, level: int | str, formatter: logging.Formatter
) -> logging.Handler:
    to_file = logging.FileHandler(path)
    to_file.setLevel(level)
    to_file.setFormatter(formatter)
    return to_file


def get_logger(
    name: str | None = None, level: int | str = logging.INFO
) -> logging.Logger:
    """``name``'s logger, setting up the default handlers if nothing logs yet."""
    if not logging.getLogger().handlers:
        init_default_logger(level, logger_name=name)
    return logging.getLogger(name)
